"""Tables of the Hopper routes (h200-run13-gluon/*.json, h200-run14-distill-pingpong/routes; hopper_routes.py wrote them) for README.md. Runs on any
CPU: the FLOPs of the computed blocks are counted again here from each route's configuration, because a route's
name meant different kernels as the kernel changed between runs (see RUNS).
    python recipes/benchmarks/routes_table.py"""
import json
from pathlib import Path

from clear_surgery.plugins import TokenLayout
from clear_surgery.surgery.tools.bench import computed_pairs, needed_flops

HERE = Path(__file__).parent
TEXT, HEADS, DIM, RADIUS = 512, 24, 128, 16.0
# file -> {route: (what ran, token tile, query blocks per program, keys per block)}; None: not a block-list kernel
V1 = "gluon v1: one warpgroup, mask words loaded at use"
V2 = "gluon v2: mask words one block ahead, scale folded into exp2"
V3 = "gluon v3: union lists of GROUPS query blocks"
V4 = "gluon v4: v3 + Q in registers"
V5 = "gluon v5: v4, persistent (runs of work items per resident program)"
V6 = "gluon v6: v4, one program per work item (one consumer warpgroup; two programs per SM)"
V7 = "gluon ping-pong: two consumer warpgroups per program taking turns on the tensor cores"
FLEX = ("flex (FlexAttention, Triton backend)", None, None, 128)
RUNS = {
    "h200-run13-gluon/run1_routes.json": {"flex-raster": FLEX, "triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V1, (8, 8), 1, 64),
                         "gluon-tiled-8x16": (V1, (8, 16), 1, 64), "gluon-raster": (V1, None, 1, 64)},
    "h200-run13-gluon/run2_routes.json": {"triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V2, (8, 8), 1, 64),
                         "gluon-tiled-8x16": (V2, (8, 16), 1, 64),
                         "gluon-tiled-8x16-n128": (V2 + "; 128-key blocks", (8, 16), 1, 128)},
    "h200-run13-gluon/run3_routes.json": {"triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V3, (8, 8), 2, 64),
                         "gluon-tiled-8x8-s5": (V3 + "; 5 stages", (8, 8), 2, 64),
                         "gluon-tiled-8x8-one-block": (V3, (8, 8), 1, 64), "gluon-tiled-8x16": (V3, (8, 16), 2, 64),
                         "gluon-tiled-8x16-n128": (V3 + "; 128-key blocks", (8, 16), 2, 128),
                         "gluon-raster": (V3, None, 2, 64)},
    "h200-run13-gluon/run4_routes.json": {"triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V4, (8, 8), 2, 64),
                         "gluon-tiled-8x8-one-block": (V4, (8, 8), 1, 64),
                         "gluon-tiled-8x8-one-block-q-smem": (V3 + " (Q in shared memory)", (8, 8), 1, 64),
                         "gluon-tiled-8x16-one-block": (V4, (8, 16), 1, 64),
                         "gluon-tiled-8x16-n128": (V4 + "; 128-key blocks", (8, 16), 2, 128)},
    "h200-run13-gluon/run5_routes.json": {"triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V5, (8, 8), 2, 64),
                         "gluon-tiled-8x8-s5": (V5 + "; 5 stages", (8, 8), 2, 64),
                         "gluon-tiled-8x8-one-block": (V5, (8, 8), 1, 64),
                         "gluon-tiled-8x8-one-block-q-smem": (V5 + " (Q in shared memory)", (8, 8), 1, 64),
                         "gluon-tiled-8x16-one-block": (V5, (8, 16), 1, 64)},
    "h200-run13-gluon/run6_routes.json": {"triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V6, (8, 8), 1, 64),
                         "gluon-tiled-8x8-s5": (V6 + "; 5 stages (one program per SM)", (8, 8), 1, 64),
                         "gluon-tiled-8x8-persistent": (V5, (8, 8), 1, 64),
                         "gluon-tiled-8x8-one-block-persistent": (V5, (8, 8), 1, 64),
                         "gluon-tiled-8x16": (V6, (8, 16), 1, 64)},
    "h200-run13-gluon/run10_routes_fa4.json": {"flex-raster": FLEX,
                              "triton-tiled": ("triton", (8, 8), 1, 64), "gluon-tiled-8x8": (V6, (8, 8), 1, 64),
                              "gluon-tiled-8x16": (V6, (8, 16), 1, 64),
                              "fa4-flash-tables-8x16": ("FlexAttention BACKEND=FLASH (FlashAttention-4 CuTe DSL), "
                                                        "mask_mod reading position tables", (8, 16), None, 128),
                              "fa4-flash-arithmetic-8x16": ("the same, mask_mod with index arithmetic", (8, 16), None,
                                                            128)},
    "h200-run14-distill-pingpong/routes/hopper_routes.json": {
        "flex-raster": FLEX, "triton-tiled": ("triton", (8, 8), 1, 64),
        "gluon-pingpong-8x8": (V7, (8, 8), 1, 64), "gluon-pingpong-8x16": (V7, (8, 16), 1, 64),
        "gluon-one-warpgroup-8x8": (V6, (8, 8), 1, 64), "gluon-one-warpgroup-8x16": (V6, (8, 16), 1, 64)},
}


def computed_flops(res, tile, groups, block_n):
    side = res // 16
    return 4.0 * computed_pairs(TokenLayout(TEXT, True, side, side, tile), RADIUS, groups, block_n) * DIM * HEADS


def main():
    for name, routes in RUNS.items():
        rows = json.loads((HERE / name).read_text())
        dense = {r["res"]: r for r in rows if r["route"] == "dense-cudnn"}
        base = {(r["res"], r["route"]): r for r in rows if "ms" in r}
        print(f"\n{name}\n\n| res | route | what ran | ms | TFLOP/s (computed blocks) | x floor (cuDNN rate) | "
              f"vs triton-tiled | vs flex-raster |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["route"] == "dense-cudnn":
                print(f"| {r['res']} | dense-cudnn | cuDNN SDPA | {r['ms']:.2f} | {r['tflops_computed']:.0f} | - | - | - |")
                continue
            what, tile, groups, block_n = routes[r["route"]]
            if "ms" not in r:
                error = " ".join(w for w in r["error"].split() if set(w) != {"="})  # without the banner rules
                print(f"| {r['res']} | {r['route']} | {what} | failed: {error[:130]} | | | | |")
                continue
            flops = computed_flops(r["res"], tile, groups, block_n) if block_n else None
            need = needed_flops(TEXT, r["res"] // 16, r["res"] // 16, RADIUS, HEADS, DIM)
            floor = need / (dense[r["res"]]["tflops_computed"] * 1e9)
            triton = base.get((r["res"], "triton-tiled"))
            flex = base.get((r["res"], "flex-raster"))
            cells = [f"{flops / r['ms'] / 1e9:.0f}" if flops else "-", f"{r['ms'] / floor:.2f}",
                     f"{triton['ms'] / r['ms']:.2f}x" if triton else "-", f"{flex['ms'] / r['ms']:.2f}x" if flex else "-"]
            print(f"| {r['res']} | {r['route']} | {what} | {r['ms']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
