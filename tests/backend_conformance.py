"""Every registered backend against the float64 reference on every feature it declares, and its refusal of
every feature it does not. FP8 is a wish, not a need: a backend without it runs a call that asks (in its own
dtype); a backend with it runs only calls that ask (every call here asks it), and is held to FP8's tolerance. Imported by test_backend_conformance.py, and run as a script there for the
Triton backends under TRITON_INTERPRET=1 (which must be set before triton is imported): prints one JSON
line per backend."""

import dataclasses
import json
import sys

import torch

from clear_surgery.plugins import BACKENDS, TokenLayout, choose_backend, pool_image_tokens, reference_attention
from clear_surgery.plugins.backends import (BACKWARD, FEATURES, FP8, IMAGE_ONLY, LSE, POOLED_KEYS, QUERY_RANGE,
                                            SEVERAL_IMAGES, TEXT_BIAS)
from clear_surgery.plugins.triton_backend import kernel_config


def base_calls(device: str):
    """Plain calls a backend may take: odd shapes in raster order (text first, batch 2), and the kernels'
    common case (whole 64-token blocks, their tile layout, text last)."""
    head_dim = 64 if device == "cuda" else 16
    yield 16, TokenLayout(5, True, 6, 7), 2.5
    yield head_dim, TokenLayout(64, False, 16, 16, kernel_config(head_dim).tile), 3.0


def tensors(layout: TokenLayout, head_dim: int, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, layout.seq_len, 2, head_dim, generator=gen).to(device, dtype) for _ in range(3)]


def plain_call(backend, device: str):
    """The first plain call (and dtype) this backend runs here, or None."""
    for head_dim, layout, radius in base_calls(device):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = tensors(layout, head_dim, dtype, device, 0)
            if backend.can_run(q, k, v, layout, radius, needs=backend.features & {FP8}):
                return head_dim, layout, radius, dtype
    return None


def feature_call(feature: str | None, head_dim, layout, radius, dtype, device):
    """(q, k, v, layout, radius, keywords) of a call that needs ``feature`` (None: the plain call)."""
    if feature == SEVERAL_IMAGES:
        layout = dataclasses.replace(layout, tile=None, images=((3, 4),))
    if feature == IMAGE_ONLY:
        layout = dataclasses.replace(layout, text_len=0)
    q, k, v = tensors(layout, head_dim, dtype, device, seed=FEATURES.index(feature) + 1 if feature else 0)
    options = {}
    if feature == POOLED_KEYS:
        weight = torch.rand(4, generator=torch.Generator().manual_seed(7)).to(device)
        grid = dataclasses.replace(layout, height=layout.height - layout.height % 2, width=layout.width - layout.width % 2)
        if grid != layout:  # pooling needs a grid of whole 2x2 blocks
            layout = dataclasses.replace(grid, text_len=layout.text_len + layout.image_tokens - grid.image_tokens)
        extra = tuple(pool_image_tokens(t, layout, 2, weight) for t in (k, v))
        layout = dataclasses.replace(layout, extra_keys=extra[0].shape[1])
        options["extra"] = extra
    if feature == TEXT_BIAS:
        bias = torch.randn(q.shape[0], layout.text_len, generator=torch.Generator().manual_seed(8))
        bias[0, -2:] = float("-inf")  # padded text keys of the first sample
        options["text_bias"] = bias.to(device)
    if feature == LSE:
        options["return_lse"] = True
    if feature == QUERY_RANGE:
        options["image_queries"] = (layout.width + 1, layout.image_tokens - layout.width)
    return q, k, v, layout, radius, options


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_feature(backend, feature, call, device) -> float:
    """The largest relative error of the backend's result(s) against the float64 reference."""
    q, k, v, layout, radius, options = feature_call(feature, *call, device)
    double = [t.double() for t in (q, k, v)]
    ref_options = {key: tuple(t.double() for t in value) if key == "extra" else value
                   for key, value in options.items() if key not in ("image_queries", "return_lse")}
    truth = reference_attention(*double, layout, radius, return_lse=feature == LSE, **ref_options)
    if feature == BACKWARD:
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device, q.dtype)
        leaves = [t.requires_grad_(True) for t in double]
        expected = torch.autograd.grad(reference_attention(*leaves, layout, radius), leaves, grad.double())
        got = backend.backward(grad, q, k, v, layout, radius, None)[:3]
        return max(rel_err(g, e) for g, e in zip(got, expected))
    got = backend.forward(q, k, v, layout, radius, None, **options)
    if feature == LSE:
        (got, lse), (truth, true_lse) = got, truth
        return max(rel_err(got, truth), (lse.double() - true_lse).abs().max().item() / 10)
    if feature == QUERY_RANGE:
        start, stop = options["image_queries"]
        rows = slice(layout.image_start + start, layout.image_start + stop)
        return rel_err(got[:, rows], truth[:, rows])
    return rel_err(got, truth)


def check_backend(name: str, device: str) -> dict:
    """{"runs": False, "why": ...} or, per feature ("plain" and each of FEATURES): the error of a declared
    one, "refused" for one it does not declare (and does not run), or what went wrong."""
    backend = BACKENDS[name]
    call = plain_call(backend, device)
    if call is None:
        head_dim, layout, radius = next(base_calls(device))
        return {"runs": False, "why": backend.refusal(*tensors(layout, head_dim, torch.float32, device, 0), layout,
                                                      radius)}
    result = {"runs": True, "dtype": str(call[3]).removeprefix("torch."), "features": sorted(backend.features)}
    asks = backend.features & {FP8}  # an FP8 backend is only ever called asking
    if asks:
        q, k, v, layout, radius, _ = feature_call(None, *call, device)
        result["unasked"] = "refused" if not backend.can_run(q, k, v, layout, radius) else "NOT REFUSED"
    for feature in (None, *FEATURES):
        key = feature or "plain"
        q, k, v, layout, radius, options = feature_call(feature, *call, device)
        needs = ({feature} if feature else set()) | asks
        if feature == FP8:  # asked of any backend: it runs (in FP8, or in its own dtype)
            chosen = choose_backend(name, q, k, v, layout, radius, needs=needs)
            result[key] = check_feature(chosen, None, call, device)
            continue
        if feature and feature not in backend.features:
            refused = not backend.can_run(q, k, v, layout, radius, needs=needs)
            try:
                choose_backend(name, q, k, v, layout, radius, needs=needs)
                refused = False
            except ValueError as err:
                refused = refused and f"does not support {feature}" in str(err)
            result[key] = "refused" if refused else "NOT REFUSED"
            continue
        why = backend.refusal(q, k, v, layout, radius, None, needs)
        result[key] = f"cannot run its own declared feature: {why}" if why else check_feature(backend, feature, call,
                                                                                               device)
    return result


if __name__ == "__main__":
    for name in sys.argv[2:]:
        print(json.dumps({"backend": name, **check_backend(name, sys.argv[1])}), flush=True)
