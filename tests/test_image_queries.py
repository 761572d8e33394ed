"""Image-query-only attention (PRX, NucleusMoE-Image): image queries over the joined text and image keys, no
text queries. CLEAR's image rows alone: the op takes the image's queries by themselves."""

import json
import os
import subprocess
import sys

import pytest
import torch

from clear_surgery.plugins import attention
from clear_surgery.surgery import ClearConfig, apply_clear, build_tiny_model, get_clear_state
from conftest import model_call, perturbed, rel_err

PRX = "PRX (PRXTransformer2DModel)"
NUCLEUS = "NucleusMoE-Image (NucleusMoEImageTransformer2DModel, MoE off)"


@pytest.mark.parametrize("backend", ["reference", "chunked", "flex"])
@pytest.mark.parametrize("text_first", [True, False])
def test_the_image_queries_alone_give_the_image_rows_forward_and_backward(backend, text_first):
    dtype = torch.float32 if backend == "flex" else torch.float64
    gen = torch.Generator().manual_seed(3)
    text, height, width = 5, 3, 7  # a non-square grid, a radius beyond it below
    q, k, v = (torch.randn(2, text + height * width, 2, 8, generator=gen, dtype=dtype, requires_grad=True)
               for _ in range(3))
    rows = slice(text, None) if text_first else slice(0, height * width)
    for radius in (1.5, 9.0):
        kwargs = dict(text_len=text, text_first=text_first, height=height, width=width, radius=radius, backend=backend)
        whole = attention(q, k, v, **kwargs)[:, rows]
        alone = q[:, rows].detach().clone().requires_grad_(True)
        got = attention(alone, k, v, **kwargs)
        grad = torch.randn(got.shape, generator=gen, dtype=dtype)
        want_grads = torch.autograd.grad(whole, (q, k, v), grad)
        got_grads = torch.autograd.grad(got, (alone, k, v), grad)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel_err(got, whole) < tol
        assert rel_err(got_grads[0], want_grads[0][:, rows]) < tol
        assert all(rel_err(g, w) < tol for g, w in zip(got_grads[1:], want_grads[1:]))


IMAGE_QUERY_CASES = """
import json, sys, torch
from clear_surgery.plugins import attention
device, backend = sys.argv[1], sys.argv[2]
gen = torch.Generator().manual_seed(5)
# (text, height, width, radius, tile, head dim): a non-square raster grid and a radius beyond it; the kernels'
# blocks and tile layout
for text, height, width, radius, tile, dim in ((5, 3, 7, 9.0, None, 16), (64, 16, 16, 3.0, (8, 8), 64)):
    for text_first in (True, False):
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        q, k, v = (torch.randn(2, text + height * width, 2, dim, generator=gen).to(device, dtype) for _ in range(3))
        rows = slice(text, None) if text_first else slice(0, height * width)
        kwargs = dict(text_len=text, text_first=text_first, height=height, width=width, radius=radius,
                      tile=tile)
        want = attention(*(t.double() for t in (q, k, v)), **kwargs, backend="reference")[:, rows]
        try:
            got = attention(q[:, rows], k, v, **kwargs, backend=backend)
        except ValueError as err:  # a layout the backend does not take (its refusal, checked in the conformance tests)
            print(json.dumps({"refused": str(err)}))
            continue
        print(json.dumps({"rel_err": float((got.double() - want).norm() / want.norm())}))
"""


def _image_query_backend(device: str, backend: str, env=None) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", IMAGE_QUERY_CASES, device, backend], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_triton_kernel_computes_the_image_queries_alone_under_the_interpreter():
    """The triton backend skips the text rows of an image-query-only call (they are dropped): its image rows
    still equal the whole call's."""
    pytest.importorskip("triton")
    results = _image_query_backend("cpu", "triton", {"TRITON_INTERPRET": "1"})
    assert len(results) == 4 and all(r.get("rel_err", 1) < 1e-5 for r in results), results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_gpu_fast_kernels_compute_the_image_queries_alone(backend):
    results = _image_query_backend("cuda", backend)
    ran = [r for r in results if "rel_err" in r]
    assert ran and all(r["rel_err"] < 2e-2 for r in ran), results


def test_image_query_calls_refuse_what_they_do_not_take():
    q, k, v = (torch.randn(1, 4 + 6, 2, 8) for _ in range(3))
    kwargs = dict(text_len=4, text_first=True, height=2, width=3, radius=2.0)
    with pytest.raises(ValueError, match="log-sum-exp"):
        attention(q[:, 4:], k, v, **kwargs, return_lse=True)
    with pytest.raises(ValueError, match="queries are every token, or the 6 image tokens alone"):
        attention(q[:, 3:], k, v, **kwargs)


@pytest.mark.parametrize("row", [PRX, NUCLEUS])
def test_the_families_convert_and_match_an_independent_window_mask(row):
    """The converted model against the stock one whose attention call is given CLEAR's mask (text keys all,
    image keys within r of each image query) built here from grid coordinates."""
    model, inputs = build_tiny_model(row)[:2]
    model = perturbed(model)
    report = apply_clear(model, ClearConfig(radius=1.5))
    site = get_clear_state(model).sites[0]
    kind = {s.module: s for s in report.sites}[site]
    assert kind.kind == "image_query" and kind.op == "clear"
    clear = model_call(model, inputs)
    text, (height, width) = 7, (3, 5)
    y, x = torch.arange(height * width) // width, torch.arange(height * width) % width
    near = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 < 1.5 ** 2
    keys = [torch.ones(height * width, text, dtype=torch.bool), near]
    mask = torch.cat(keys if kind.order == "text_first" else keys[::-1], 1)

    class Masked(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.nn.functional.scaled_dot_product_attention:
                given = kwargs.get("attn_mask")
                kwargs["attn_mask"] = mask if given is None else mask & given.bool()
            return func(*args, **kwargs)

    from clear_surgery.surgery import remove_clear

    remove_clear(model)
    with Masked():
        want = model_call(model, inputs)
    assert rel_err(clear, want) < 1e-5
    assert rel_err(model_call(model, inputs), want) > 1e-3  # the window does mask
