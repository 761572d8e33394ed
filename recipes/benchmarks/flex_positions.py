"""The flex backend's mask_mod, forward and forward+backward at 8192² r16 (FLUX shapes, 8x16 tiles): token
positions from (y, x) tables (the default) against the closed form from the index, and against a plain
table-lookup BlockMask over the same blocks (no index-range checks, text first only: the reference point).
    python recipes/benchmarks/flex_positions.py [SIZE ...]   (writes $OUT/flex_positions.json)"""
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask

from clear_surgery.plugins import TokenLayout, flex
from clear_surgery.plugins.flex import _compiled_flex, _to_indices, clear_block_mask
from clear_surgery.plugins.layout import classify_blocks
from clear_surgery.surgery.tools.bench import time_ms

sizes = [int(a) for a in sys.argv[1:]] or [8192]
radius, text, heads, dim, tile = 16, 512, 24, 128, (8, 16)


def plain_table_block_mask(layout):
    """The reference point: the same blocks, mask_mod = text row/column or a table-lookup window."""
    any_true, all_true = classify_blocks(layout, radius, flex.BLOCK, flex.BLOCK, "cuda")
    _, y, x = layout.positions("cuda")
    ys, xs, t, r2 = y.float(), x.float(), layout.text_len, radius * radius

    def mask_mod(b, h, q, kv):
        dy, dx = ys[q] - ys[kv], xs[q] - xs[kv]
        return (q < t) | (kv < t) | (dy * dy + dx * dx < r2)

    return BlockMask.from_kv_blocks(*_to_indices(any_true & ~all_true), *_to_indices(all_true), BLOCK_SIZE=flex.BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(layout.seq_len, layout.seq_len))


rows = []
for size in sizes:
    side = size // 16
    layout = TokenLayout(text, True, side, side, tile)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, layout.seq_len, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_(True) for _ in range(3))
    grad = torch.randn_like(q)
    for variant in ("arithmetic", "tables", "plain-table-blockmask"):
        os.environ["CLEAR_FLEX_POSITIONS"] = "tables" if variant == "plain-table-blockmask" else variant
        clear_block_mask.cache_clear()
        mask = plain_table_block_mask(layout) if variant == "plain-table-blockmask" else clear_block_mask(
            layout, float(radius), q.device)

        def forward():
            return _compiled_flex()(q, k, v, block_mask=mask)

        def both():
            forward().backward(grad)

        with torch.no_grad():
            fwd = time_ms(forward)
        row = dict(res=size, radius=radius, tile=list(tile), variant=variant, forward_ms=fwd,
                   forward_backward_ms=time_ms(both))
        print(json.dumps(row), flush=True)
        rows.append(row)
out = Path(os.environ.get("OUT", "/tmp"))
(out / "flex_positions.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                     "rows": rows}, indent=1) + "\n")
