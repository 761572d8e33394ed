"""Routes to a faster CLEAR forward on Hopper, one layer (FLUX shapes: 24 heads x 128, 512 text tokens first,
bf16), all in one run: dense cuDNN (the rate), the official-style flex-raster, the Triton kernel, the
warp-specialized Gluon kernel on three token layouts, and PyTorch FlexAttention lowered to FlashAttention-4's
CuTe DSL kernels (BACKEND=FLASH; needs flash-attn-4 and nvidia-cutlass-dsl) with the flex backend's two mask_mods.
Every CLEAR route is checked against the Triton kernel on the same layout (which the tests check against the
pure-PyTorch reference).
    python recipes/benchmarks/hopper_routes.py [SIZE ...]    (RADII=16; writes $OUT/hopper_routes.json)"""
import functools
import json
import os
import sys
from pathlib import Path

import torch

from clear_surgery.plugins import TokenLayout, flex
from clear_surgery.plugins.flex import _compiled_flex, clear_block_mask
from clear_surgery.plugins.gluon_backend import gluon_clear_attention
from clear_surgery.plugins.triton_backend import kernel_config, triton_clear_attention
from clear_surgery.surgery.tools.bench import computed_pairs, needed_flops, time_ms

sizes = [int(a) for a in sys.argv[1:]] or [4096, 8192]
radii = [float(r) for r in os.environ.get("RADII", "16").split(",")]
text, heads, dim = 512, 24, 128
out_dir = Path(os.environ.get("OUT", "."))


def flash_route(positions):
    def run(q, k, v, layout, radius):
        os.environ["CLEAR_FLEX_POSITIONS"] = positions
        clear_block_mask.cache_clear()
        mask = clear_block_mask(layout, radius, q.device)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return _compiled_flex()(qt, kt, vt, block_mask=mask, kernel_options={"BACKEND": "FLASH"}).transpose(1, 2)

    return run


def flex_route(q, k, v, layout, radius):
    os.environ["CLEAR_FLEX_POSITIONS"] = "tables"
    clear_block_mask.cache_clear()
    return flex.flex_clear_attention(q, k, v, layout, radius)


# route -> (function, tile of the token layout, (query blocks per program, keys per block) of its computed pairs;
# None: FlexAttention's 128 x 128 blocks)
ROUTES = {
    "flex-raster": (flex_route, None, (None, 128)),
    "triton-tiled": (triton_clear_attention, kernel_config(dim).tile, (1, 64)),
    # gluon: ping-pong (two consumer warpgroups taking turns, the default) or one consumer warpgroup per program
    # with one 64-row query block (two programs per SM) or two; 64- or 128-key blocks; K/V stages
    "gluon-pingpong-8x8": (functools.partial(gluon_clear_attention, pingpong=True), (8, 8), (1, 64)),
    "gluon-pingpong-8x16": (functools.partial(gluon_clear_attention, pingpong=True), (8, 16), (1, 64)),
    "gluon-one-warpgroup-8x8": (functools.partial(gluon_clear_attention, pingpong=False), (8, 8), (1, 64)),
    "gluon-one-warpgroup-8x16": (functools.partial(gluon_clear_attention, pingpong=False), (8, 16), (1, 64)),
    "gluon-tiled-8x8-q-smem": (functools.partial(gluon_clear_attention, q_in_regs=False), (8, 8), (1, 64)),
    "gluon-tiled-8x8-two-blocks": (functools.partial(gluon_clear_attention, groups=2), (8, 8), (2, 64)),
    "gluon-tiled-8x8-two-blocks-s5": (functools.partial(gluon_clear_attention, groups=2, stages=5), (8, 8), (2, 64)),
    "gluon-tiled-8x16-two-blocks": (functools.partial(gluon_clear_attention, groups=2), (8, 16), (2, 64)),
    "gluon-tiled-8x16-two-blocks-n128": (functools.partial(gluon_clear_attention, groups=2, block_n=128), (8, 16),
                                         (2, 128)),
    "gluon-raster": (gluon_clear_attention, None, (1, 64)),
    "fa4-flash-tables-8x16": (flash_route("tables"), (8, 16), (None, 128)),
    "fa4-flash-arithmetic-8x16": (flash_route("arithmetic"), (8, 16), (None, 128)),
}
only = os.environ.get("ROUTES")
if only:
    ROUTES = {k: v for k, v in ROUTES.items() if k in only.split(",")}

rows = []
for size in sizes:
    side = size // 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, text + side * side, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dense_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), rep=3)
    dense_rate = 4.0 * q.shape[1] ** 2 * dim * heads / dense_ms / 1e9
    rows.append(dict(res=size, route="dense-cudnn", ms=dense_ms, tflops_computed=dense_rate))
    print(json.dumps(rows[-1]), flush=True)
    for radius in radii:
        need = needed_flops(text, side, side, radius, heads, dim)
        flex_ms = None
        for name, (fn, tile, counting) in ROUTES.items():
            layout = TokenLayout(text, True, side, side, tile)
            row = dict(res=size, radius=radius, route=name, tile=tile)
            try:
                out = fn(q, k, v, layout, radius)
                want = triton_clear_attention(q, k, v, layout, radius)
                row["rel_err_vs_triton"] = float((out.float() - want.float()).norm() / want.float().norm())
                row["max_abs_vs_triton"] = float((out.float() - want.float()).abs().max())
                del out, want
                row["ms"] = time_ms(lambda: fn(q, k, v, layout, radius))
                pairs = computed_pairs(layout, radius, *counting)
                row["tflops_computed"] = 4.0 * pairs * dim * heads / row["ms"] / 1e9
                row["tflops_effective"] = need / row["ms"] / 1e9
                row["x_floor_cudnn"] = row["ms"] / (need / (dense_rate * 1e9))
                flex_ms = row["ms"] if name == "flex-raster" else flex_ms
                if flex_ms:
                    row["vs_flex_raster"] = flex_ms / row["ms"]
            except Exception as err:  # a route that cannot run is recorded with its reason
                row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    q = k = v = qt = kt = vt = None  # free the inputs before the next size
    torch.cuda.empty_cache()

out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "hopper_routes.json").write_text(json.dumps(rows, indent=1))
