"""Run by test_triton.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported):
compares the triton kernel with the float64 reference and prints one line per case."""
import dataclasses
import json
import math
import sys

import torch

from clear_surgery.plugins import TokenLayout, pool_image_tokens, reference_attention
from clear_surgery.plugins import triton_backend
from clear_surgery.plugins.triton_aot import triton_aot_attention
from clear_surgery.plugins.triton_backend import KernelConfig, triton_clear_attention

cases = json.loads(sys.argv[1])
backend = sys.argv[2] if len(sys.argv) > 2 else "triton"  # triton (table-driven) | triton-aot (self-contained)
default_configs = list(triton_backend.CONFIGS)
for i, (b, h, d, text_len, text_first, gh, gw, r, tile, dtype, *options) in enumerate(cases):
    # optional (block_m, block_n, segment_block_n): run that kernel config instead of the table's;
    # optional {"down": f}: pooled keys and values of f x f blocks as extra keys (the "down" variant)
    # optional {"text_lens": [...]}: per sample, the valid text tokens (the rest is padding, hidden as keys;
    # the valid ones get a random bias)
    blocks = [o for o in options if isinstance(o, list)]
    settings = next((o for o in options if isinstance(o, dict)), {})
    # optional {"images": [[h, w], ...]}: further images after the first, each on its own grid
    down, text_lens = settings.get("down"), settings.get("text_lens")
    images = tuple(tuple(g) for g in settings.get("images", ()))
    triton_backend.CONFIGS[:] = [(d, math.inf, KernelConfig(*blocks[0], 4, 2, tuple(tile)))] if blocks else default_configs
    gen = torch.Generator().manual_seed(1000 + i)
    n = text_len + gh * gw + sum(h2 * w2 for h2, w2 in images)
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(getattr(torch, dtype)) for _ in range(3))
    layout = TokenLayout(text_len, text_first, gh, gw, tuple(tile) if tile else None, images=images)
    # poisoned output buffer: an element the kernel does not write stays NaN and fails the case
    poisoned = torch.full_like(q, float("nan"))
    extra = ref_extra = None
    if down:
        weight = torch.rand(down * down, generator=gen)
        extra = tuple(pool_image_tokens(t, layout, down, weight) for t in (k, v))
        ref_extra = tuple(t.double() for t in extra)
        layout = dataclasses.replace(layout, extra_keys=extra[0].shape[1])
    text_bias = None  # the padded text keys hidden (-inf), the others with a bias of their own
    if text_lens:
        text_bias = torch.randn(b, text_len, generator=gen).masked_fill(
            torch.arange(text_len)[None, :] >= torch.tensor(text_lens)[:, None], float("-inf"))
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), layout, r, extra=ref_extra,
                                       text_bias=text_bias, return_lse=True)
    result = {"case": i}
    if backend == "triton":  # with the log-sum-exp of every query row (each element written, or NaN)
        out, lse = triton_clear_attention(q, k, v, layout, r, extra=extra, text_bias=text_bias, out=poisoned,
                                          return_lse=True)
        lse_err = (lse.double() - ref_lse).abs().max().item()
        result["lse_err"] = lse_err if math.isfinite(lse_err) else None
    else:
        out = triton_aot_attention(q, k, v, layout, r, out=poisoned)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(json.dumps({**result, "rel_err": err if math.isfinite(err) else None}))
