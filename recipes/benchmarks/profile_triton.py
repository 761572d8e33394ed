"""Where the triton kernel's time goes, by ablation (H200, FLUX shapes, one layer). Each variant
changes only the host-side block lists, so the same compiled kernel runs:
  full          the real kernel (window masks of regular block pairs from the mask table)
  computed-mask the real kernel with every window mask computed from token positions (CLEAR_MASK_TABLE=0)
  no-mask       partial blocks visited without the window mask (wrong output: timing only)
  text-only     image queries visit only the text keys (and text queries everything)
  dense-kernel  r beyond the grid: every block full, i.e. our kernel as a dense attention
Usage on the GPU machine: python recipes/benchmarks/profile_triton.py; writes $OUT/profile.json."""
import functools
import json
import os

import torch

from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins import triton_backend as tb
from clear_surgery.surgery.tools.bench import LAYER_BACKENDS, needed_flops, time_ms

H, D, T = 24, 128, 512
real_lists = tb.image_block_lists.__wrapped__


def to_mask(counts, index, blocks):
    valid = torch.arange(index.shape[1], device=index.device)[None, :] < counts[:, None]
    rows = torch.arange(counts.numel(), device=index.device)[:, None].expand_as(index)
    mask = torch.zeros(counts.numel(), blocks, dtype=torch.bool, device=index.device)
    mask[rows[valid], index[valid].long()] = True
    return mask


def variant_lists(kind):
    @functools.lru_cache(maxsize=8)  # built once per shape, outside the timed calls
    def lists(height, width, tile, radius, bm, bn, device):
        lists = real_lists(height, width, tile, radius, bm, bn, device)
        fc, fi, pc, pi, ragged, entries, table, mode = lists
        none = torch.full_like(entries[:, :1], -1)
        if kind == "no-mask":  # visit the same blocks, none masked (the ragged last one stays masked)
            blocks = -(-height * width // bn)
            visit = to_mask(fc, fi, blocks) | to_mask(pc, pi, blocks)
            return tb.BlockLists(*tb._compact(visit), torch.zeros_like(pc), pi[:, :1], ragged, none, table, 0)
        if kind == "text-only":
            return tb.BlockLists(torch.zeros_like(fc), fi[:, :1], torch.zeros_like(pc), pi[:, :1],
                                 torch.zeros_like(ragged), none, table, 0)
        return lists
    return lists


rows = []
for size, radius in [(4096, 16), (8192, 16), (4096, 8), (4096, 32)]:
    side = size // 16
    q, k, v = (torch.randn(1, T + side * side, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = TokenLayout(T, True, side, side, tb.kernel_config(D).tile)
    dense_ms = time_ms(lambda: LAYER_BACKENDS["dense-cudnn"](q, k, v, None, None), 1, 3)
    for kind in ("full", "computed-mask", "no-mask", "text-only", "dense-kernel"):
        r = 10 * side if kind == "dense-kernel" else radius
        if kind == "dense-kernel" and size == 8192:
            continue
        os.environ["CLEAR_MASK_TABLE"] = "0" if kind == "computed-mask" else "1"
        tb.image_block_lists = variant_lists(kind)
        tb.triton_clear_attention(q, k, v, layout, r)  # builds and caches the lists
        ms = time_ms(lambda: tb.triton_clear_attention(q, k, v, layout, r), 2, 10)
        row = dict(res=size, radius=radius, variant=kind, ms=ms, dense_cudnn_ms=dense_ms)
        if kind == "dense-kernel":
            row["tflops"] = 4.0 * q.shape[1] ** 2 * D * H / ms / 1e9
        else:
            row["tflops_effective"] = needed_flops(T, side, side, radius, H, D) / ms / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    tb.image_block_lists = real_lists
    del q, k, v
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "profile.json"), "w"), indent=1)
