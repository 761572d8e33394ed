"""Sequences with more than one image (FLUX.1 Kontext: the target, then a reference image of another
size with its own grid): each image's tokens sit on their own grid, and an image query sees the keys
within its radius in every image, its own and the others, in those coordinates."""

import json

import pytest
import torch

from clear_surgery.plugins import TokenLayout, attention, dense_mask, reference_attention
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, remove_clear
from clear_surgery.surgery.core.builtin import load_builtin
from clear_surgery.surgery.core.families import GridError
from conftest import coverage_model, model_call, perturbed, rel_err


def independent_mask(text_len, text_first, grids, radius):
    """Element by element: text sees all and is seen by all; image tokens within the radius, each with
    (y, x) in its own image's grid."""
    positions = [(i // w, i % w) for h, w in grids for i in range(h * w)]
    tokens = [None] * text_len + positions if text_first else positions + [None] * text_len
    n = len(tokens)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, a in enumerate(tokens):
        for j, b in enumerate(tokens):
            mask[i, j] = a is None or b is None or (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 < radius**2
    return mask


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("grids", [((6, 7), (4, 9)), ((3, 3), (5, 2), (2, 6))], ids=["two", "three"])
def test_mask_and_backends_equal_an_independent_mask(text_first, grids):
    text_len, radius = 5, 2.5
    layout = TokenLayout(text_len, text_first, *grids[0], images=grids[1:])
    truth_mask = independent_mask(text_len, text_first, grids, radius)
    assert torch.equal(dense_mask(layout, radius), truth_mask)
    n = truth_mask.shape[0]
    gen = torch.Generator().manual_seed(len(grids))
    leaves = [torch.randn(2, n, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    truth = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves),
                                                             attn_mask=truth_mask).transpose(1, 2)
    grad = torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(truth, leaves, grad)
    for backend, dtype, tol in (("reference", torch.float64, 1e-10), ("flex", torch.float32, 2e-5)):
        mine = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        out = attention(*mine, text_len=text_len, text_first=text_first, height=grids[0][0], width=grids[0][1],
                        images=grids[1:], radius=radius, backend=backend)
        assert rel_err(out, truth) < tol, backend
        for which, g, w in zip("qkv", torch.autograd.grad(out, mine, grad.to(dtype)), want):
            assert rel_err(g, w) < tol, (backend, which)


def _kontext_ids(*grids):
    parts = []
    for segment, (h, w) in enumerate(grids):
        ids = torch.zeros(h, w, 3)
        ids[..., 0], ids[..., 1], ids[..., 2] = segment, torch.arange(h)[:, None], torch.arange(w)[None, :]
        parts.append(ids.reshape(-1, 3))
    return torch.cat(parts)


def _kontext_call(model, grids, batch=2, text=6):
    gen = torch.Generator().manual_seed(1)
    ids = _kontext_ids(*grids)
    return dict(hidden_states=torch.randn(batch, ids.shape[0], 16, generator=gen),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=gen),
                pooled_projections=torch.randn(batch, 32, generator=gen), timestep=torch.full((batch,), 0.5),
                img_ids=ids, txt_ids=torch.zeros(text, 3), guidance=torch.full((batch,), 3.5), return_dict=False)


def test_kontext_shaped_call_converts_and_equals_stock_at_a_covering_radius():
    model = perturbed(load_builtin("tiny-flux"))
    inputs = _kontext_call(model, ((6, 8), (4, 10)))  # target 6x8, reference 4x10
    stock = model_call(model, inputs)
    apply_clear(model, ClearConfig(radius=1000))
    assert rel_err(model_call(model, inputs), stock) < 1e-6
    runtime = get_clear_state(model).runtime
    assert (runtime.grid, runtime.images) == ((6, 8), ((4, 10),))
    before = get_clear_state(model).analysis
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=2), analysis=before, verify=False)  # verified above
    assert rel_err(model_call(model, inputs), stock) > 1e-2
    with pytest.raises(GridError, match="img_ids of image 2 are not a raster grid"):
        bad = dict(inputs, img_ids=torch.cat([_kontext_ids((6, 8)), _kontext_ids((4, 10))[:, [0, 2, 1]] + 1]))
        bad["img_ids"][48:, 0] = 1
        model_call(model, bad)


def test_a_query_sees_its_window_in_the_other_image():
    """At the op: perturbing a reference key inside a target query's window (same place in the other
    grid) changes that query; one outside it does not."""
    grids, text_len = ((6, 8), (4, 10)), 3
    n = text_len + 48 + 40
    q, k, v = (torch.randn(1, n, 1, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    args = dict(text_len=text_len, text_first=True, height=6, width=8, images=grids[1:], radius=2, backend="reference")
    base = attention(q, k, v, **args)
    query = text_len + 1 * 8 + 2  # target (1, 2)
    near, far = text_len + 48 + 1 * 10 + 3, text_len + 48 + 3 * 10 + 9  # reference (1, 3) and (3, 9)
    for key, changes in ((near, True), (far, False)):
        v2 = v.clone()
        v2[0, key] += 5
        moved = (attention(q, k, v2, **args) - base)[0, query].abs().max() > 1e-3
        assert bool(moved) == changes


def test_kontext_pipeline_equals_dense_at_a_covering_radius():
    import diffusers
    from PIL import Image

    from clear_surgery.surgery.core.builtin import tiny_pipeline

    pipe = tiny_pipeline("tiny-flux")
    kontext = diffusers.FluxKontextPipeline(**pipe.components)
    kontext.set_progress_bar_config(disable=True)
    reference = Image.fromarray((torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0)) * 255)
                                .to(torch.uint8).numpy())
    call = dict(prompt="a cat", image=reference, height=64, width=64, num_inference_steps=2, output_type="latent",
                _auto_resize=False, max_area=64 * 64)
    dense = kontext(**call, generator=torch.Generator().manual_seed(0)).images
    apply_clear(kontext.transformer, ClearConfig(radius=1000))
    clear = kontext(**call, generator=torch.Generator().manual_seed(0)).images
    assert get_clear_state(kontext.transformer).runtime.images == ((12, 20),)
    assert rel_err(clear, dense) < 1e-5


def test_profile_measures_the_rules_for_the_other_image(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from clear_surgery.surgery.cli import app

    Image.fromarray((torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0)) * 255)
                    .to(torch.uint8).numpy()).save(tmp_path / "reference.png")
    run = CliRunner().invoke(app, ["profile", "--model", "builtin:tiny-flux", "--resolution", "64", "--steps", "1",
                                   "--radii", "2,40", "--reference-image", str(tmp_path / "reference.png"),
                                   "--out", str(tmp_path / "loc")])
    assert run.exit_code == 0, run.output
    rules = json.loads((tmp_path / "loc" / "locality.json").read_text())["several_images_kept_share_mean"]
    # at a radius covering both grids: CLEAR's rule keeps everything, its own image alone does not
    assert rules["window in every image"][-1] == pytest.approx(1.0, abs=1e-6)
    assert rules["window and all of the other images"][-1] == pytest.approx(1.0, abs=1e-6)
    assert rules["own image only"][-1] < 0.9
    assert rules["own image only"][0] <= rules["window in every image"][0] <= rules[
        "window and all of the other images"][0]
    bad = CliRunner().invoke(app, ["profile", "--model", "builtin:tiny-flux", "--reference-image",
                                   str(tmp_path / "loc" / "locality.json"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a readable image" in bad.output and not (tmp_path / "x").exists()


def test_layout_refuses_tiles_with_several_images():
    q = torch.randn(1, 3 + 16 + 4, 1, 16)
    with pytest.raises(ValueError, match="tile token layout takes one image"):
        attention(q, q, q, text_len=3, text_first=True, height=4, width=4, images=((2, 2),), radius=2,
                  tile=(2, 2))
    assert reference_attention(q, q, q, TokenLayout(3, True, 4, 4, images=((2, 2),)), 2).shape == q.shape


@pytest.mark.parametrize("family", ["FLUX.2 (Flux2Transformer2DModel)", "QwenImage (QwenImageTransformer2DModel)"])
def test_reference_images_of_flux2_and_qwenimage_edit(family):
    """FLUX.2 marks a reference image by another value in the first column of its ids; QwenImage-Edit
    lists it in img_shapes. Both convert and equal the stock model at a covering radius."""
    from clear_surgery.surgery.tools import coverage

    model, inputs = coverage_model(family)
    extra = 4 * 6
    inputs = dict(inputs, hidden_states=torch.cat([inputs["hidden_states"], torch.randn(1, extra, 16)], 1))
    if "img_shapes" in inputs:
        inputs["img_shapes"] = [[(1, *coverage.GRID), (1, 4, 6)]]
    else:
        ref = torch.zeros(4, 6, 4)
        ref[..., 0], ref[..., 1], ref[..., 2] = 10, torch.arange(4)[:, None], torch.arange(6)[None, :]
        inputs["img_ids"] = torch.cat([inputs["img_ids"], ref.reshape(1, -1, 4)], 1)
    stock = model_call(model.eval(), inputs)
    apply_clear(model, ClearConfig(radius=1000))
    assert rel_err(model_call(model, inputs), stock) < 1e-5
    assert get_clear_state(model).runtime.images == ((4, 6),)
    before = get_clear_state(model).analysis
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=1.5), analysis=before, verify=False)  # verified above
    assert rel_err(model_call(model, inputs), stock) > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("text_first", [True, False])
def test_gpu_backends_equal_an_independent_mask(backend, text_first):
    grids, text_len, radius = ((24, 32), (16, 20)), 77, 5
    truth_mask = independent_mask(text_len, text_first, grids, radius)
    n = truth_mask.shape[0]
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(2, n, 2, 64, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    truth = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves),
                                                             attn_mask=truth_mask).transpose(1, 2)
    grad = torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(truth, leaves, grad)
    mine = [x.detach().to("cuda", torch.bfloat16).requires_grad_(True) for x in leaves]
    out = attention(*mine, text_len=text_len, text_first=text_first, height=24, width=32, images=grids[1:],
                    radius=radius, backend=backend)
    assert rel_err(out.cpu(), truth) < 2e-2
    for which, g, w in zip("qkv", torch.autograd.grad(out, mine, grad.to("cuda", torch.bfloat16)), want):
        assert rel_err(g.cpu(), w) < 3e-2, which
