"""Benchmarks: one CLEAR attention layer against dense SDPA and FlexAttention, and a
FLUX.1-dev-shaped transformer step (random weights), dense vs CLEAR. Writes JSON and a PNG."""

from __future__ import annotations

import json
import math
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clear_surgery.plugins import TokenLayout, attention, flex_clear_attention
from clear_surgery.plugins.gluon_backend import BLOCK, gluon_clear_attention, group_lists
from clear_surgery.plugins.gluon_fp8_backend import gluon_fp8_clear_attention
from clear_surgery.plugins.layout import classify_blocks
from clear_surgery.plugins.triton_backend import kernel_config, max_visible_d2, triton_clear_attention
from clear_surgery.surgery.core.families import family_for_class

FLUX_DEV = family_for_class("FluxTransformer2DModel").real_configs["FLUX.1-dev"]
# FLUX_DEV's architecture at toy width and depth: the --tiny CPU smoke runs of the H200 scripts and tests
TINY_FLUX_DEV = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def window_pairs(height: int, width: int, radius: float) -> int:
    """Image query/key pairs with dy² + dx² < r², windows truncated at the border (exact)."""
    reach = math.ceil(radius) - 1 if float(radius).is_integer() else math.floor(radius)
    total = 0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx < radius * radius:
                total += max(height - abs(dy), 0) * max(width - abs(dx), 0)
    return total


def needed_flops(text: int, height: int, width: int, radius: float, heads: int, head_dim: int, batch=1) -> float:
    image = height * width
    pairs = text * (text + image) + image * text + window_pairs(height, width, radius)
    return 4.0 * pairs * head_dim * heads * batch


def window_union_per_query(side: int, radius: float, th: int, tw: int) -> float:
    """Mean over the image queries of a side x side grid of |union of the windows of the query's
    th x tw tile| (tiles aligned to the grid, edge tiles smaller), counted exactly: the keys per query
    that a kernel multiplying a whole tile of queries by the same keys must compute, at the least."""
    r2, reach = max_visible_d2(radius), math.ceil(radius)

    def along(tile):
        """Per tile along one axis (tiles, offsets from the tile's start): is the key inside the grid, its
        distance to the tile's extent; and the tile's size."""
        starts = torch.arange(0, side, tile)
        sizes = torch.clamp(side - starts, max=tile)
        offsets = torch.arange(-reach, tile + reach)
        pos = starts[:, None] + offsets[None, :]
        gap = torch.clamp(torch.maximum(-offsets[None, :], offsets[None, :] - (sizes[:, None] - 1)), min=0)
        return ((pos >= 0) & (pos < side)).double(), gap, sizes.double()

    (vy, gy, hy), (vx, gx, hx) = along(th), along(tw)
    total = 0.0
    for i in range(vy.shape[0]):  # tile rows: keys within r2 of the tile, inside the grid
        inside = (gy[i][None, :, None] ** 2 + gx[:, None, :] ** 2 <= r2).double()  # (tiles x, oy, ox)
        counts = torch.einsum("o,top,tp->t", vy[i], inside, vx)
        total += float((counts * hy[i] * hx).sum())
    return total / (side * side)


def computed_pairs(layout: TokenLayout, radius: float, groups: int | None = 1, block_n: int = 64) -> int:
    """(query, key) token pairs a block-sparse kernel computes: programs of ``groups`` x 64 queries over the union
    of their ``block_n``-key blocks (the gluon kernel; the Triton kernel is groups = 1), or with groups None
    FlexAttention's 128 x 128 blocks of its BlockMask."""
    if groups is None:
        any_true, _ = classify_blocks(layout, radius, 128, 128, torch.device("cpu"))
        return int(any_true.sum()) * 128 * 128
    lists = group_lists(layout.height, layout.width, layout.tile, radius, torch.device("cpu"), groups, block_n)
    rows, text = BLOCK * groups, layout.text_len
    image = int(lists.count.sum()) + (layout.image_tokens // rows) * (text // block_n)
    return (image + (text // rows) * (layout.seq_len // block_n)) * rows * block_n


def time_ms(fn, warmup: int = 2, rep: int = 5) -> float:
    """Median wall time of fn in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _dense(sdpa_backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, sdpa_backend)

    def run(q, k, v, layout, radius):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return run


def _clear(fn, tile):
    """tile: None (raster), 'kernel' (the triton kernel's tile for the head dim) or (rows, cols)."""

    def run(q, k, v, layout, radius):
        if tile is not None:
            shape = kernel_config(q.shape[-1], radius).tile if tile == "kernel" else tile
            layout = TokenLayout(layout.text_len, layout.text_first, layout.height, layout.width, shape)
        return fn(q, k, v, layout, radius)

    return run


def _clear_down(backend: str, factor: int):
    """The "down" variant through the op (pooling of keys and values included), on the kernel's tiles."""

    def run(q, k, v, layout, radius):
        weight = torch.full((factor, factor), 1.0 / factor**2, device=q.device, dtype=q.dtype)
        return attention(q, k, v, text_len=layout.text_len, text_first=layout.text_first, height=layout.height,
                         width=layout.width, radius=radius, backend=backend, pool_weight=weight,
                         tile=kernel_config(q.shape[-1], radius).tile)

    run.pooling = factor
    return run


LAYER_BACKENDS = {
    "dense-cudnn": _dense("CUDNN_ATTENTION"),
    "dense-flash": _dense("FLASH_ATTENTION"),
    "dense-math": _dense("MATH"),
    "flex-raster": _clear(flex_clear_attention, None),
    "flex-tiled": _clear(flex_clear_attention, (8, 16)),  # 128 tokens: one FlexAttention block
    "triton-raster": _clear(triton_clear_attention, None),
    "triton-tiled": _clear(triton_clear_attention, "kernel"),
    "gluon-tiled": _clear(gluon_clear_attention, (8, 8)),  # the warp-specialized Hopper kernel (sm_90)
    # its FP8 twin (image queries in e4m3), text rows and image rows on one stream
    "gluon-fp8-tiled": _clear(partial(gluon_fp8_clear_attention, concurrent_text=False), (8, 8)),
    # the ping-pong kernels' variant with each warpgroup's softmax overlapping its own next Q·Kᵀ (to measure)
    "gluon-overlap-tiled": _clear(partial(gluon_clear_attention, pingpong=True, overlap=True), (8, 8)),
    "gluon-fp8-overlap-tiled": _clear(partial(gluon_fp8_clear_attention, overlap=True, stages=5), (8, 8)),
    # the FP8 backend as it runs by default: its text rows on a second stream, beside the quantization and image rows
    "gluon-fp8-concurrent-tiled": _clear(partial(gluon_fp8_clear_attention, concurrent_text=True), (8, 8)),
    "flex-tiled-down4": _clear_down("flex", 4),  # the official clear_local_<r>_down_4 variant
    "triton-tiled-down4": _clear_down("triton", 4),
}
DENSE = ("dense-cudnn", "dense-flash", "dense-math")


def bench_attention(sizes, radii, backends, *, heads=24, head_dim=128, text=512, dtype=torch.bfloat16,
                    device="cuda", rep=5) -> list[dict]:
    """sizes: image resolutions in pixels (FLUX: 16 pixels per token side)."""
    rows = []
    jobs = [(s, r, b) for s in sizes for r in radii for b in backends if not (b in DENSE and r != radii[0])]
    progress = tqdm(jobs, desc="attention", unit="run")
    tensors = {}
    for size, radius, backend in progress:
        progress.set_postfix_str(f"{size}² r{radius} {backend}")
        side = size // 16
        if size not in tensors:
            tensors.clear()
            torch.cuda.empty_cache() if device == "cuda" else None
            gen = torch.Generator(device=device).manual_seed(0)
            n = text + side * side
            tensors[size] = [torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen)
                             for _ in range(3)]
        q, k, v = tensors[size]
        layout = TokenLayout(text, True, side, side)
        row = dict(res=size, grid=side, tokens=q.shape[1], radius=None if backend in DENSE else radius,
                   backend=backend)
        try:
            fn = LAYER_BACKENDS[backend]
            if getattr(fn, "pooling", None):  # keys every image query sees besides text and window
                row["pooled_keys"] = (side // fn.pooling) ** 2
            row["ms"] = time_ms(lambda: fn(q, k, v, layout, radius), warmup=2, rep=rep)
        except Exception as err:  # a backend that cannot run at this size is recorded, not fatal
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
    _add_rates(rows, heads, head_dim, text)
    return rows


def _add_rates(rows, heads, head_dim, text):
    """Effective TFLOP/s (needed FLOPs / time), ratio to the FLOP floor (needed FLOPs at the dense
    rate measured in the same run; cudnn and flash floors both given) and speedup over flex-raster."""
    for row in rows:
        if "ms" not in row:
            continue
        n = row["tokens"]
        if row["backend"] in DENSE:
            row["tflops"] = 4.0 * n * n * head_dim * heads / row["ms"] / 1e9
    rate = {(r["res"], r["backend"]): r.get("tflops") for r in rows if r["backend"] in DENSE}
    flex = {(r["res"], r["radius"]): r.get("ms") for r in rows if r["backend"] == "flex-raster"}
    for row in rows:
        if "ms" not in row or row["backend"] in DENSE:
            continue
        need = needed_flops(text, row["grid"], row["grid"], row["radius"], heads, head_dim)
        need += 4.0 * row["grid"] ** 2 * row.get("pooled_keys", 0) * head_dim * heads
        row["needed_gflop"] = need / 1e9
        row["tflops_effective"] = need / row["ms"] / 1e9
        for dense in ("dense-cudnn", "dense-flash"):
            if rate.get((row["res"], dense)):
                floor = need / (rate[(row["res"], dense)] * 1e9)
                row[f"floor_ms_{dense}"] = floor
                row[f"x_floor_{dense}"] = row["ms"] / floor
        if flex.get((row["res"], row["radius"])):
            row["speedup_vs_flex_raster"] = flex[(row["res"], row["radius"])] / row["ms"]


def build_flux_dev(device="cuda", dtype=torch.bfloat16, config=None):
    """FLUX.1-dev-shaped transformer with random weights, built on meta and materialized on device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**(config or FLUX_DEV))
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=gen)
    if any(True for _ in model.named_buffers()):  # to_empty leaves buffers uninitialized; FLUX has none
        raise RuntimeError("model has buffers that build_flux_dev does not initialize")
    return model.eval()


def write_random_checkpoint(folder: Path, config: dict | None = None, *, model_class: str = "FluxTransformer2DModel",
                            dtype=torch.bfloat16, shards: int = 5, seed: int = 0, progress: bool = True) -> Path:
    """A diffusers model folder with random weights (normal, std 0.02) of the model class built from
    ``config`` (default: FLUX.1-dev's), written shard by shard: one tensor in memory at a time, so a
    FLUX.1-dev-sized folder (22 GiB in bf16) needs next to no memory."""
    import diffusers
    from huggingface_hub import split_torch_state_dict_into_shards

    from clear_surgery.hub.atomic import atomic_directory, write_json
    from clear_surgery.hub.checkpoint import INDEX_NAME, WEIGHTS_PATTERN
    from clear_surgery.hub.safetensors_io import write_file

    cls = getattr(diffusers, model_class)
    with torch.device("meta"):
        model = cls(**(config or FLUX_DEV))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
    meta = {n: torch.empty(s, dtype=dtype, device="meta") for n, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=-(-total // shards) + 1)
    generator = torch.Generator().manual_seed(seed)

    def produce(name):
        return torch.randn(shapes[name], generator=generator, dtype=torch.float32).mul_(0.02).to(dtype)

    with atomic_directory(folder, overwrite=True) as tmp:
        model.save_config(tmp)
        for filename, names in tqdm(list(split.filename_to_tensors.items()), desc=f"writing {Path(folder).name}",
                                    unit="shard", disable=not progress):
            write_file(tmp / filename, [(n, dtype, shapes[n]) for n in names], produce, metadata={"format": "pt"})
        if split.is_sharded:
            write_json(tmp / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return Path(folder)


def analyze_flux_dev(config=None):
    """The analysis of a FLUX.1-dev-shaped transformer, traced on the meta device (no memory, no compute):
    what apply_clear needs, so that it does not trace the real model again."""
    from diffusers import FluxTransformer2DModel

    from clear_surgery.surgery import analyze

    with torch.device("meta"):
        return analyze(FluxTransformer2DModel(**(config or FLUX_DEV)))


def flux_inputs(model, size, text=512, batch=1):
    from clear_surgery.surgery import example_inputs

    side = size // 16
    return example_inputs(model, text_len=text, grid=(side, side), batch=batch)


def compiled_for_timing(model, how: str | None):
    """``model`` as a step is timed: itself (None), ``torch.compile``d whole ("full") or with each repeated block
    compiled ("regional", diffusers' compile_repeated_blocks). Compiled afresh for each configuration (dynamo's
    caches reset): a model's graphs change with CLEAR, and past dynamo's recompile limit the blocks would run
    uncompiled."""
    if how is None:
        return model
    torch._dynamo.reset()
    if how == "regional":
        model.compile_repeated_blocks()
        return model
    return torch.compile(model)


def bench_step(sizes, radius, *, backend="triton", token_layout="tiled", dense_max=8192, device="cuda",
               config=None, quantize: str | None = None, fp8_attention: bool = False,
               compiled: str | None = None) -> list[dict]:
    """Per size: the dense and the CLEAR step of a FLUX.1-dev-shaped transformer (random weights), ms.
    ``compiled``: None (eager), "full" or "regional" (compiled_for_timing; the warm-up call compiles)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear, set_backend

    report = analyze_flux_dev(config)
    model = build_flux_dev(device, config=config)
    if quantize is not None:  # dense and CLEAR alike: linear layers in FP8, attention as it is
        from .quantize import quantize_linear_layers

        quantize_linear_layers(model, quantize)
    rows = []
    for size in tqdm(sizes, desc="flux step", unit="size"):
        inputs = flux_inputs(model, size)
        # FP8 attention is a wish that "auto" grants (a named bf16 backend would not)
        row = dict(res=size, tokens=inputs["hidden_states"].shape[1] + 512, radius=radius,
                   backend="auto" if fp8_attention else backend,
                   token_layout=token_layout, quantize=quantize, fp8_attention=fp8_attention, compiled=compiled)
        with torch.no_grad():
            if size <= dense_max:
                # ~95 s per dense step at 8192² on an H200: one cold run there (at 4096² cold read
                # 0.3 s above warm, about 0.3% of an 8192² step)
                huge = size >= 8192
                run = compiled_for_timing(model, compiled)
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                  SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
                    row["dense_ms"] = time_ms(lambda: run(**inputs), warmup=0 if huge and not compiled else 1,
                                              rep=1 if huge else 2 if size >= 4096 else 3)
            apply_clear(model, ClearConfig(radius=radius, token_layout=token_layout), analysis=report, verify=False)
            set_backend(model, row["backend"], fp8_attention=fp8_attention)
            run = compiled_for_timing(model, compiled)
            row["clear_ms"] = time_ms(lambda: run(**inputs), warmup=1, rep=2 if size >= 4096 else 3)
            remove_clear(model)
        if "dense_ms" in row:
            row["speedup"] = row["dense_ms"] / row["clear_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def plot(attention_rows, step_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = sorted({r["radius"] for r in attention_rows if r["radius"] is not None})
    fig, axes = plt.subplots(1, len(radii) + (1 if step_rows else 0), figsize=(5 * (len(radii) + 1), 4),
                             squeeze=False)
    for ax, radius in zip(axes[0], radii):
        for backend in dict.fromkeys(r["backend"] for r in attention_rows):
            pts = [(r["res"], r["ms"]) for r in attention_rows if r["backend"] == backend and "ms" in r
                   and (r["radius"] == radius or backend in DENSE)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend, linestyle="--" if backend in DENSE else "-")
        floor = [(r["res"], r["floor_ms_dense-cudnn"]) for r in attention_rows
                 if r["backend"] == "triton-tiled" and r["radius"] == radius and "floor_ms_dense-cudnn" in r]
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", label="FLOP floor (cuDNN rate)")
        ax.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel="ms per layer", title=f"r = {radius}")
        ax.legend(fontsize=7)
    if step_rows:
        ax = axes[0][-1]
        for key, label in (("dense_ms", "dense"), ("clear_ms", "CLEAR")):
            pts = [(r["res"], r[key] / 1e3) for r in step_rows if key in r]
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="image side (px)", ylabel="s per step",
               title=f"FLUX.1-dev-shaped step, r = {step_rows[0]['radius']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)

def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def torch_version() -> str:
    import torch

    return torch.__version__


def attention_table(rows) -> str:
    lines = [f"{'res':>5} {'r':>4} {'backend':<14} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} {'vs flex-raster':>14}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['res']:>5} {r['radius'] or '-':>4} {r['backend']:<14} error: {r['error'][:60]}")
            continue
        tf = r.get("tflops_effective", r.get("tflops", float("nan")))
        lines.append(f"{r['res']:>5} {r['radius'] or '-':>4} {r['backend']:<14} {r['ms']:>9.3f} {tf:>8.1f} "
                     f"{r.get('x_floor_dense-cudnn', float('nan')):>8.2f} {r.get('speedup_vs_flex_raster', float('nan')):>14.2f}")
    return "\n".join(lines)


def run_bench(folder: Path, sizes, radii, backends, *, heads: int, head_dim: int, text: int, device: str,
              step_sizes, step_radius: float, dense_step_max: int, quantize: str | None = None,
              fp8_attention: bool = False, compiled: str | None = None, echo=print) -> None:
    """The attention table (``attention.json``, printed), the step (``step.json``, when ``step_sizes``) and
    ``bench.png`` into ``folder``."""
    meta = {"device": torch_device_name(device), "torch": torch_version()}
    rows = bench_attention(sizes, radii, backends, heads=heads, head_dim=head_dim, text=text, device=device)
    (folder / "attention.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    echo(attention_table(rows))
    step_rows = []
    if step_sizes:
        step_rows = bench_step(step_sizes, step_radius, dense_max=dense_step_max, device=device, quantize=quantize,
                               fp8_attention=fp8_attention, compiled=compiled)
        (folder / "step.json").write_text(json.dumps({**meta, "rows": step_rows}, indent=1) + "\n")
    plot(rows, step_rows, folder / "bench.png")
