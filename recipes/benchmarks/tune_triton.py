"""Time triton kernel configs (BLOCK_M, BLOCK_N, warps, stages) at FLUX shapes; prints a table and
writes $OUT/tune.json. Usage (on the GPU machine): python recipes/benchmarks/tune_triton.py"""
import json
import os
import sys

import torch

from clear_surgery.plugins import TokenLayout, reference_attention
from clear_surgery.plugins import triton_backend as tb
from clear_surgery.surgery.bench import LAYER_BACKENDS, needed_flops, time_ms

CANDIDATES = [tuple(int(x) for x in c.split("/")) for c in os.environ.get(
    "CONFIGS", "64/64/4/3,64/64/4/4,64/128/4/3,64/32/4/3,64/64/8/3,128/64/8/3,128/128/8/3").split(",")]
TILES = {128: (8, 16), 64: (8, 8)}
CASES = [(int(s), float(r)) for s, r in (c.split(":") for c in os.environ.get("CASES", "4096:8,4096:16,4096:32,8192:16").split(","))]
H, D, T = 24, 128, 512


def run_config(cfg, q, k, v, layout, radius):
    tb.CONFIGS[:] = [(D, float("inf"), *cfg)]
    return tb.triton_clear_attention(q, k, v, layout, radius)


rows = []
# correctness of every config at a small size first
side = 48
q, k, v = (torch.randn(1, T + side * side, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for cfg in CANDIDATES:
    layout = TokenLayout(T, True, side, side, TILES[cfg[0]])
    out = run_config(cfg, q, k, v, layout, 16)
    ref = reference_attention(q.float(), k.float(), v.float(), layout, 16)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print("check", cfg, f"rel_err={err:.2e}", flush=True)
    assert err < 1e-2, cfg
for size, radius in CASES:
    side = size // 16
    q, k, v = (torch.randn(1, T + side * side, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = time_ms(lambda: LAYER_BACKENDS["dense-cudnn"](q, k, v, None, None), 1, 3)
    rate = 4.0 * q.shape[1] ** 2 * D * H / dense / 1e9
    need = needed_flops(T, side, side, radius, H, D)
    for cfg in CANDIDATES:
        layout = TokenLayout(T, True, side, side, TILES[cfg[0]])
        ms = time_ms(lambda: run_config(cfg, q, k, v, layout, radius), 2, 10)
        row = dict(res=size, radius=radius, config=cfg, ms=ms, eff_tflops=need / ms / 1e9,
                   x_floor_cudnn=ms / (need / rate / 1e9), dense_cudnn_ms=dense)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "tune.json"), "w"), indent=1)
