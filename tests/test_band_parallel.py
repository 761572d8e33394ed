"""Band-parallel CLEAR attention on torch.distributed (gloo, CPU processes) equals single-process CLEAR."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clear_surgery.plugins import TokenLayout, reference_attention
from clear_surgery.plugins.band_parallel import BandPlan, BandPlanError, band_parallel_attention

# (batch, heads, head_dim, text_len, text_first, height, width, radius)
CASES = [
    (2, 2, 16, 5, True, 11, 7, 2.5),  # non-square, batch 2
    (1, 3, 16, 9, False, 9, 13, 3),  # text last
    (1, 2, 16, 4, True, 12, 5, 1),  # r = 1: no halo at all
    (2, 1, 32, 3, False, 13, 6, 4.2),  # halo of 4 rows, bands of 4-7 rows
]


def _inputs(case, seed=0):
    b, h, d, text_len, text_first, gh, gw, r = case
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, text_len + gh * gw, h, d, generator=g) for _ in range(3)]


def _rank_part(t, case, plan, rank):
    """The text tokens and ``rank``'s band of image rows, as that rank holds them."""
    _, _, _, text_len, text_first, *_ = case
    band = plan.tokens(rank)
    if text_first:
        return torch.cat([t[:, :text_len], t[:, text_len + band.start:text_len + band.stop]], 1)
    return torch.cat([t[:, band], t[:, t.shape[1] - text_len:]], 1)


def _text_rows(t, text: slice) -> torch.Tensor:
    rows = torch.zeros(t.shape[1], dtype=torch.bool)
    rows[text] = True
    return rows


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, case in enumerate(CASES):
            b, h, d, text_len, text_first, gh, gw, r = case
            q, k, v = _inputs(case, seed=i)
            plan = BandPlan.split(gh, gw, r, world)
            parts = [_rank_part(t, case, plan, rank) for t in (q, k, v)]
            for merge in ("exact", "average"):
                results[(rank, i, merge)] = band_parallel_attention(*parts, text_len=text_len, text_first=text_first,
                                                                    plan=plan, radius=r, backend="reference",
                                                                    text_merge=merge)
    finally:
        dist.destroy_process_group()


def _spawn(worker, world: int) -> dict:
    """Run worker(rank, world, init_file, results) in ``world`` gloo processes; their results."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        return dict(results)


@pytest.mark.parametrize("world", [2, 3])
def test_band_parallel_equals_one_process(world):
    results = _spawn(_worker, world)
    for i, case in enumerate(CASES):
        b, h, d, text_len, text_first, gh, gw, r = case
        q, k, v = _inputs(case, seed=i)
        whole = reference_attention(q, k, v, TokenLayout(text_len, text_first, gh, gw), r)
        plan = BandPlan.split(gh, gw, r, world)
        text = slice(0, text_len) if text_first else slice(-text_len, None)
        for rank in range(world):
            expected = _rank_part(whole, case, plan, rank)
            torch.testing.assert_close(results[(rank, i, "exact")], expected, atol=1e-5, rtol=1e-5,
                                       msg=f"case {i}, rank {rank} of {world}")
            # the paper's averaging (Eq. 7): image rows exact, text rows off (measured on these random
            # inputs: relative error 0.22-0.48 over the cases, ranks and world sizes; printed with -s)
            averaged = results[(rank, i, "average")]
            image = ~_text_rows(averaged, text)
            torch.testing.assert_close(averaged[:, image], expected[:, image], atol=1e-5, rtol=1e-5)
            error = ((averaged[:, text] - expected[:, text]).norm() / expected[:, text].norm()).item()
            print(f"average-merge text error case {i} rank {rank} world {world}: {error:.3f}")
            assert error > 1e-2, error


def test_plan_splits_rows_and_refuses_thin_bands():
    plan = BandPlan.split(13, 6, 4.2, 3)
    assert [plan.rows(r) for r in range(3)] == [(0, 5), (5, 9), (9, 13)] and plan.halo == 4
    tiled = BandPlan.split(13, 6, 2.5, 2, tile=(2, 4))  # whole 2-row tiles: 7 tile rows, the last one ragged
    assert [tiled.rows(r) for r in range(2)] == [(0, 8), (8, 13)] and tiled.halo == 2
    assert BandPlan.split(13, 6, 3.5, 2, tile=(2, 4)).halo == 4  # 3 rows of keys: two whole tile rows
    assert BandPlan.split(12, 5, 1, 4).halo == 0
    with pytest.raises(BandPlanError, match="thinner than the 4 rows"):
        BandPlan.split(13, 6, 4.2, 4)  # bands of 3-4 rows need keys from two bands away
    assert math.ceil(4.2) - 1 == 4


# -- whole models: tiny FLUX and its ControlNet, each rank running its band of image rows

MODEL_GRID = (16, 6)  # token rows x columns: non-square; bands of 5-8 rows (whole 2-row tiles) over 2 or 3 ranks
# (built-in model, tile shape of the tile token layout or None: raster)
MODELS = (("tiny-flux", None), ("tiny-flux-controlnet", None), ("tiny-sd3", None), ("tiny-flux", (2, 4)),
          ("tiny-flux-controlnet", (2, 4)), ("tiny-sd3", (2, 4)))


def _clear(model, tile):
    from clear_surgery.surgery import ClearConfig, apply_clear

    config = ClearConfig(radius=2.5, token_layout="tiled" if tile else "raster",
                         tile_shape=list(tile) if tile else None)
    apply_clear(model, config, backend="reference", verify=False)  # the rewrite is tested elsewhere


def _model_inputs(name, seed=0, dtype=None):
    from clear_surgery.surgery import example_inputs, load_builtin

    model = load_builtin(name, dtype=dtype)
    torch.manual_seed(seed)
    return model, example_inputs(model, 7, MODEL_GRID, batch=2)


def _model_worker(rank, world, init_file, results):
    from clear_surgery.surgery import enable_patch_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, tile in MODELS:
            model, inputs = _model_inputs(name)
            _clear(model, tile)
            enable_patch_parallel(model)
            with torch.no_grad():
                results[(rank, name, tile)] = model(**{**inputs, "return_dict": False})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [3])  # 3: a middle band with halos on both sides; 2 ranks: the op test, generate
def test_patch_parallel_model_equals_one_process(world):
    results = _spawn(_model_worker, world)
    for name, tile in MODELS:
        model, inputs = _model_inputs(name)
        _clear(model, tile)
        with torch.no_grad():
            whole = model(**{**inputs, "return_dict": False})
        flat = [t for part in whole for t in (part if isinstance(part, (list, tuple)) else [part])]
        for rank in range(world):
            got = results[(rank, name, tile)]
            got = [t for part in got for t in (part if isinstance(part, (list, tuple)) else [part])]
            assert len(got) == len(flat) and all(g.shape == w.shape for g, w in zip(got, flat))
            for g, w in zip(got, flat):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"{name}, tile {tile}, rank {rank} of {world}")


def _fp8_model(patch=setattr, tile=(2, 4)):
    """tiny-flux in bf16, CLEAR in the tile layout, its linear layers in FP8 through torchao: on this CPU with
    torchao's hardware check lifted (its float8 matmul runs here; the GPU test runs the real one). ``patch``:
    how to lift it (in the test's own process, monkeypatch.setattr, so that other tests see the check)."""
    pytest.importorskip("torchao")
    from torchao.quantization import quant_api

    from clear_surgery.surgery.tools import quantize

    patch(quant_api, "_check_hardware_support", lambda granularity: None)
    patch(quantize, "fp8_reason", lambda device: None)
    model, inputs = _model_inputs("tiny-flux", dtype=torch.bfloat16)  # torchao's row-wise FP8 takes bf16 weights
    _clear(model, tile)
    assert quantize.quantize_linear_layers(model, "fp8")
    return model, inputs


def _fp8_worker(rank, world, init_file, results):
    from clear_surgery.surgery import enable_patch_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, inputs = _fp8_model()
        enable_patch_parallel(model)
        with torch.no_grad():
            results[rank] = model(**inputs)[0]
    finally:
        dist.destroy_process_group()


def test_patch_parallel_fp8_linear_model_equals_one_process(monkeypatch):
    """FP8 linear layers (torchao tensor subclasses for weights, row-wise scales: one per token, so a band's tokens
    quantize as they do in the whole) under patch parallelism: each rank's output is the one-process FP8 model's,
    up to bf16's rounding of the band-parallel sums (0.0066 relative; the bf16 model alone: 0.0048)."""
    results = _spawn(_fp8_worker, 2)
    model, inputs = _fp8_model(monkeypatch.setattr)
    with torch.no_grad():
        whole = model(**inputs)[0]
    assert type(model.transformer_blocks[0].ff.net[2].weight).__name__ != "Parameter"  # FP8 weights in place
    for rank in range(2):
        assert results[rank].shape == whole.shape
        err = ((results[rank].float() - whole.float()).norm() / whole.float().norm()).item()
        assert err < 0.015, (rank, err)


def test_generate_nproc_2_gives_the_single_process_image(tmp_path):
    """clear-surgery generate --nproc 2 (torchrun, gloo on CPU) writes the image one process writes."""
    import subprocess

    import numpy as np
    from PIL import Image

    from conftest import cli_exe

    common = ["generate", "--model", "builtin:tiny-flux", "--radius", "2", "--prompt", "a cat", "--height", "64",
              "--width", "96", "--steps", "2"]
    one = subprocess.run([cli_exe(), *common, "--out", str(tmp_path / "one.png")], capture_output=True, text=True)
    two = subprocess.run([cli_exe(), *common, "--nproc", "2", "--out", str(tmp_path / "two.png")], capture_output=True,
                         text=True)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "patch parallel over 2 processes" in two.stdout
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("one", "two"))
    assert a.shape == b.shape == (64, 96, 3) and np.abs(a - b).max() <= 1


def test_patch_parallel_refuses_what_it_cannot_split(tmp_path):
    """SD3.5's dense image-only attention, an unknown text merge, no process group: one clear error each."""
    from clear_surgery.surgery import ClearConfig, apply_clear, enable_patch_parallel, load_builtin
    from clear_surgery.surgery.core.errors import InvalidValueError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = load_builtin("tiny-sd35")
        apply_clear(model, ClearConfig(radius=2), verify=False)
        with pytest.raises(InvalidValueError, match="attn2 attends densely over all image tokens"):
            enable_patch_parallel(model)
        flux = load_builtin("tiny-flux")
        apply_clear(flux, ClearConfig(radius=2), verify=False)
        with pytest.raises(InvalidValueError, match="text_merge must be one of"):
            enable_patch_parallel(flux, text_merge="median")
    finally:
        dist.destroy_process_group()
    with pytest.raises(InvalidValueError, match="launch with torchrun"):
        enable_patch_parallel(flux)
