"""Time triton kernel configs at FLUX shapes; prints one JSON line per (case, config) and writes
$OUT/tune.json. A config is BLOCK_M/BLOCK_N/SEGMENT_BLOCK_N/warps/stages/THxTW (tile of BLOCK_M
tokens); case "dense" = r beyond the grid (every block full: the kernel's raw dense rate).
Usage (on the GPU machine): CONFIGS=... CASES=4096:16,8192:16,4096:dense python recipes/benchmarks/tune_triton.py"""
import json
import math
import os

import torch

from clear_surgery.plugins import TokenLayout, reference_attention
from clear_surgery.plugins import triton_backend as tb
from clear_surgery.surgery.tools.bench import LAYER_BACKENDS, needed_flops, time_ms


def parse(text):
    *ints, tile = text.split("/")
    return tb.KernelConfig(*(int(x) for x in ints), tuple(int(x) for x in tile.split("x")))


CANDIDATES = [parse(c) for c in os.environ.get("CONFIGS", "64/64/64/4/3/8x8,128/64/128/8/3/16x8").split(",")]
CASES = [c.split(":") for c in os.environ.get("CASES", "4096:8,4096:16,4096:32,8192:16,4096:dense").split(",")]
H, D, T = 24, 128, 512


def run_config(config, q, k, v, radius, side):
    tb.CONFIGS[:] = [(D, math.inf, config)]
    return tb.triton_clear_attention(q, k, v, TokenLayout(T, True, side, side, config.tile), radius)


rows = []
working = []
side = 48  # correctness of every config at a small size first; configs that fail to compile are reported
q, k, v = (torch.randn(1, T + side * side, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for config in CANDIDATES:
    try:
        out = run_config(config, q, k, v, 16, side)
    except Exception as err:  # e.g. triton's OutOfResources (shared memory) for big blocks x stages
        print("skip", config, type(err).__name__, str(err)[:200], flush=True)
        continue
    ref = reference_attention(q.float(), k.float(), v.float(), TokenLayout(T, True, side, side, config.tile), 16)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print("check", config, f"rel_err={err:.2e}", flush=True)
    assert err < 1e-2, config
    working.append(config)
for size, radius in CASES:
    side = int(size) // 16
    q, k, v = (torch.randn(1, T + side * side, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = time_ms(lambda: LAYER_BACKENDS["dense-cudnn"](q, k, v, None, None), 1, 3)
    rate = 4.0 * q.shape[1] ** 2 * D * H / dense / 1e9
    r = 10.0 * side if radius == "dense" else float(radius)
    need = needed_flops(T, side, side, r, H, D)
    for config in working:
        ms = time_ms(lambda: run_config(config, q, k, v, r, side), 2, 10)
        row = dict(res=int(size), radius=radius, config=list(config), ms=ms, eff_tflops=need / ms / 1e9,
                   x_floor_cudnn=ms / (need / rate / 1e9), dense_cudnn_ms=dense)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "tune.json"), "w"), indent=1)
