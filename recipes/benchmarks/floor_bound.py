"""How close to the FLOP floor can a tensor-core CLEAR kernel get? A lower bound on the work.

An MMA instruction multiplies a group of queries by the same keys: on Hopper a wgmma has 64 rows
(mma.sync: 16). So every key that any query of a group sees is computed for all queries of the
group. For a group that is a rectangle of 64 (or 16) image tokens, the keys computed per query are
at least the union of its queries' windows, even with key-exact gathering (no key blocks at all).
This script counts those unions exactly (windows clipped at the grid border, every tile position),
adds the text work (text keys for image queries, all keys for text queries) and prints
  computed / needed  =  the best "x floor" any such kernel can reach running at the dense rate,
beside the same ratio for the kernel's real 8x8 key blocks (image_block_lists).
    python recipes/benchmarks/floor_bound.py   (CPU, a few seconds; writes $OUT/floor_bound.json)"""
import json
import os

import torch

from clear_surgery.plugins.triton_backend import image_block_lists, kernel_config
from clear_surgery.surgery.tools.bench import needed_flops, window_union_per_query

TEXT, HEADS, HEAD_DIM = 512, 24, 128


def ratio(side, radius, keys_per_image_query):
    image = side * side
    computed = 4.0 * (TEXT * (TEXT + image) + image * (TEXT + keys_per_image_query)) * HEAD_DIM * HEADS
    return computed / needed_flops(TEXT, side, side, radius, HEADS, HEAD_DIM)


rows = []
for size in (4096, 8192):
    side = size // 16
    for radius in (8.0, 16.0, 32.0):
        row = dict(res=size, radius=radius)
        for group in (64, 16):
            unions = {(h, group // h): window_union_per_query(side, radius, h, group // h)
                      for h in range(1, group + 1) if group % h == 0}
            best = min(unions, key=unions.get)
            row[f"best_{group}_tile"] = best
            row[f"bound_{group}"] = ratio(side, radius, unions[best])
        config = kernel_config(HEAD_DIM, radius)
        lists = image_block_lists(side, side, config.tile, radius, config.block_m, config.block_n, torch.device("cpu"))
        listed = float((lists.full_count + lists.part_count).double().mean()) * config.block_n
        row["kernel_keys_per_query"] = listed
        row["kernel_blocks"] = ratio(side, radius, listed)
        rows.append(row)
        print(json.dumps(row), flush=True)
print("\n| res | r | best 64-token tile | bound, 64-query groups | bound, 16-query groups | our 8x8 key blocks |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['res']}² | {r['radius']:g} | {r['best_64_tile'][0]}x{r['best_64_tile'][1]} | {r['bound_64']:.3f} | "
          f"{r['bound_16']:.3f} | {r['kernel_blocks']:.3f} |")
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "floor_bound.json"), "w"), indent=1)
