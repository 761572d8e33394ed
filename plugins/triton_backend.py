"""Triton backend of clear::attention: host side (block lists, launch, the reason it cannot run a call, config table).

Forward only; the backward falls back to the flex backend's (recomputed under autograd), which
the op's autograd picks automatically through ``Backend.backward``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from .layout import TokenLayout, classify_blocks, image_positions

try:  # triton is optional (the `triton` extra); the backend registers only when it imports
    import triton

    from .triton_kernel import clear_fwd_kernel
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


class KernelConfig(NamedTuple):
    block_m: int  # queries per program; the tile token layout's tile holds exactly block_m tokens
    block_n: int  # keys per listed image key block
    segment_block_n: int  # keys per block of the dense segments (text keys; every key of text queries)
    num_warps: int
    num_stages: int
    tile: tuple[int, int]  # default tile (th, tw) of the tile token layout, th * tw == block_m


# (head_dim, radius upper bound) -> kernel config; first matching row wins. head_dim 128: the fastest
# on an H200 at r = 8, 16, 32 of every config measured, 128-row query blocks included
# (recipes/benchmarks/tune-h200.json, h200-run8/tune.json, h200-run8b/tune.json); 64/32/16: not measured yet.
CONFIGS = [
    (128, math.inf, KernelConfig(64, 64, 64, 4, 3, (8, 8))),
    (64, math.inf, KernelConfig(64, 64, 64, 4, 3, (8, 8))),
    (32, math.inf, KernelConfig(64, 32, 32, 4, 2, (8, 8))),
    (16, math.inf, KernelConfig(32, 16, 16, 4, 2, (4, 8))),
]
HEAD_DIMS = sorted({d for d, *_ in CONFIGS})


def kernel_config(head_dim: int, radius: float = math.inf) -> KernelConfig:
    for d, max_r, config in CONFIGS:
        if d == head_dim and radius <= max_r:
            return config
    raise ValueError(f"no triton config for head dim {head_dim}")


def use_mask_table() -> bool:
    """Window masks of regular block pairs from a precomputed table (CLEAR_MASK_TABLE=0: always computed)."""
    return os.environ.get("CLEAR_MASK_TABLE", "1") != "0"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tensors_reason(q, v) -> str | None:
    """Why a Triton kernel of this project cannot take these tensors (None: it can); shared by the
    triton backends."""
    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not interpreting():
        return f"needs a CUDA device (or TRITON_INTERPRET=1), got {q.device.type}"
    if q.dtype not in (torch.bfloat16, torch.float16) and not (interpreting() and q.dtype == torch.float32):
        return f"dtype {q.dtype} (bf16 and fp16 only)"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (supported: {HEAD_DIMS}, same for v)"
    return None


def triton_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    return tensors_reason(q, v)


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, nk) bool -> counts (nq,) int32 and indices (nq, max(counts, 1)) int32, chosen first."""
    counts = mask.sum(1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return counts.contiguous(), order.to(torch.int32).contiguous()


class BlockLists(NamedTuple):
    full_count: torch.Tensor  # per image query block: key blocks wholly inside every window ...
    full_index: torch.Tensor
    part_count: torch.Tensor  # ... and key blocks that need the window mask
    part_index: torch.Tensor
    ragged: torch.Tensor  # visit the ragged last key block (bounds-checked and masked)
    table_entries: torch.Tensor  # like part_index: row of mask_table, or -1 (mask computed)
    mask_table: torch.Tensor
    table_mode: int  # 0: no pair has a table entry, 2: every listed pair has one, 1: some (kernel branches)


@functools.lru_cache(maxsize=64)
def image_block_lists(height: int, width: int, tile, radius: float, block_m: int, block_n: int,
                      device: torch.device, images: tuple = ()):
    """Per image query block: the image key blocks to visit without and with the window mask, and
    whether to visit the ragged last key block (bounds-checked and masked); plus, for the partial
    blocks, an entry of a table of precomputed window masks (or -1: compute the mask) and the table.
    ``images``: further images' grids (their masks are computed from the position tables)."""
    image_only = TokenLayout(0, True, height, width, tile, images=images)
    any_true, all_true = classify_blocks(image_only, radius, block_m, block_n, device)
    ragged = torch.zeros(any_true.shape[0], dtype=torch.int32, device=device)
    if image_only.image_tokens % block_n:
        ragged = any_true[:, -1].to(torch.int32).contiguous()
        any_true[:, -1] = all_true[:, -1] = False
    full = all_true & any_true
    part_count, part_index = _compact(any_true & ~full)
    if images:
        entries, table, mode = torch.full(part_index.shape, -1, dtype=torch.int32), torch.zeros(1, 1, 1), 0
    else:
        entries, table, mode = mask_table(height, width, tile, radius, block_m, block_n, part_count, part_index)
    return BlockLists(*_compact(full), part_count, part_index, ragged, entries.to(device), table.to(device), mode)


@functools.lru_cache(maxsize=64)
def position_tables(layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) int32 of every image token, for sequences of several images (the kernel reads them)."""
    y, x = layout.image_token_positions(torch.arange(layout.image_tokens))
    return y.to(device, torch.int32).contiguous(), x.to(device, torch.int32).contiguous()


def block_shape(tile, block: int) -> tuple[int, int] | None:
    """The rectangle (rows, cols) that a block of ``block`` consecutive tokens covers when it is
    regular: a whole tile, a band of whole tile rows, or a raster row segment; None otherwise."""
    if tile is None:
        return 1, block
    th, tw = tile
    if block % tw or th % (block // tw):
        return None
    return block // tw, tw


def regular_blocks(height: int, width: int, tile, block: int):
    """Blocks whose tokens fill one rectangle of ``block_shape`` (so that the window mask between two
    blocks depends only on their offset): (regular, y0, x0)."""
    shape = block_shape(tile, block)
    count = height * width // block
    if shape is None or count == 0:
        return torch.zeros(0, dtype=torch.bool), None, None
    y, x = image_positions(torch.arange(count * block).view(count, block), height, width, tile)
    c = torch.arange(block)
    y0, x0 = y[:, :1], x[:, :1]
    regular = ((y == y0 + c // shape[1]) & (x == x0 + c % shape[1])).all(1)
    return regular, y0[:, 0], x0[:, 0]


def mask_table(height, width, tile, radius, block_m, block_n, part_count, part_index):
    """(entries like part_index: table row or -1, table (rows, block_m, block_n) int8 window masks,
    table mode as BlockLists.table_mode)."""
    part_count, part_index = part_count.cpu(), part_index.cpu()
    entries = torch.full(part_index.shape, -1, dtype=torch.int32)
    empty = torch.zeros(1, block_m, block_n, dtype=torch.int8)
    q_regular, qy0, qx0 = regular_blocks(height, width, tile, block_m)
    k_regular, ky0, kx0 = regular_blocks(height, width, tile, block_n)
    if not q_regular.any() or not k_regular.any():
        return entries, empty, 0
    listed = torch.arange(part_index.shape[1])[None, :] < part_count[:, None]
    qb = torch.arange(part_index.shape[0])[:, None].expand_as(part_index)
    kb = part_index.long()
    nq, nk = q_regular.numel(), k_regular.numel()
    qi, ki = qb.clamp(max=nq - 1), kb.clamp(max=nk - 1)  # a ragged last block is never regular
    usable = listed & (qb < nq) & (kb < nk) & q_regular[qi] & k_regular[ki]
    dy, dx = (qy0[qi] - ky0[ki])[usable], (qx0[qi] - kx0[ki])[usable]
    if dy.numel() == 0:
        return entries, empty, 0
    offsets, row = torch.unique(torch.stack([dy, dx], 1), dim=0, return_inverse=True)
    entries[usable] = row.to(torch.int32)

    def local(block):  # position of each token inside its block
        cols = block_shape(tile, block)[1]
        c = torch.arange(block)
        return c // cols, c % cols

    (qy, qx), (ky, kx) = local(block_m), local(block_n)
    d_y = offsets[:, 0, None, None] + qy[None, :, None] - ky[None, None, :]
    d_x = offsets[:, 1, None, None] + qx[None, :, None] - kx[None, None, :]
    table = (d_y * d_y + d_x * d_x <= max_visible_d2(radius)).to(torch.int8)
    return entries, table.contiguous(), 2 if bool(usable.sum() == listed.sum()) else 1


def max_visible_d2(radius: float) -> int:
    """Largest integer d² with d² < r² (the kernel compares integers)."""
    return min(math.ceil(radius * radius) - 1, 2**31 - 1)


def output_buffer(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The kernels' output: ``out`` when given (checked to be shaped like q), else a new tensor like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be shaped like q {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def triton_clear_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                           extra=None, text_bias=None, out: torch.Tensor | None = None, return_lse: bool = False,
                           image_queries: tuple[int, int] | None = None):
    """Same signature and result as reference_attention (inference forward); ``out``: a buffer shaped
    like q to write into (every element is written). ``image_queries=(start, stop)``: compute only the
    image queries with these image-token indices (and no text query) against every key; the other
    rows of the output are left as they are (patch parallelism: a band's queries among its halos)."""
    batch, tokens, heads, head_dim = q.shape
    config = kernel_config(head_dim, radius)
    block_m, block_n = config.block_m, config.block_n
    out = output_buffer(q, out)
    text_start = 0 if layout.text_first else layout.image_tokens
    lists = image_block_lists(layout.height, layout.width, layout.tile, float(radius), block_m, block_n, q.device,
                              layout.images)
    pos_y, pos_x = position_tables(layout, q.device) if layout.images else (lists.ragged, lists.ragged)
    text_blocks = -(-layout.text_len // block_m)
    image_blocks = -(-layout.image_tokens // block_m)
    first_block = 0
    if image_queries is not None:
        start, stop = image_queries
        if not 0 <= start < stop <= layout.image_tokens:
            raise ValueError(f"image_queries {image_queries} outside the {layout.image_tokens} image tokens")
        text_blocks, first_block = 0, start // block_m
        image_blocks = -(-stop // block_m) - first_block
    qk_scale = (scale if scale is not None else head_dim ** -0.5) * 1.4426950408889634
    th, tw = layout.tile or (1, 1)
    grid = ((text_blocks + image_blocks) * batch * heads,)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device) if return_lse else out
    ek, ev = extra if extra is not None else (k, v)  # without extra keys: placeholders, never read
    # the text padding's bias in the kernel's log2 units (placeholder pointer without one, never read)
    bias = (text_bias.float() * 1.4426950408889634).contiguous() if text_bias is not None else lists.ragged
    clear_fwd_kernel[grid](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, batch * heads, layout.text_len, text_start, layout.image_tokens, layout.image_start, layout.height, layout.width,
        th, tw, max_visible_d2(radius), qk_scale, lists.full_count, lists.full_index, lists.part_count,
        lists.part_index, lists.ragged, lists.full_index.shape[1], lists.part_index.shape[1], text_blocks,
        image_blocks, lists.table_entries, lists.mask_table, lse, first_block,
        ek, ev, ek.stride(0), ek.stride(1), ek.stride(2), ev.stride(0), ev.stride(1), ev.stride(2),
        ek.shape[1] if extra is not None else 0, bias, pos_y, pos_x,
        BLOCK_M=block_m, BLOCK_N=block_n, SEGMENT_BLOCK_N=config.segment_block_n, HEAD_DIM=head_dim,
        TILED=layout.tile is not None,
        USE_TABLE=lists.table_mode if use_mask_table() else 0,
        UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16, STORE_LSE=return_lse, HAS_EXTRA=extra is not None,
        TEXT_BIASED=text_bias is not None, POS_TABLE=bool(layout.images),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return (out, lse.transpose(1, 2)) if return_lse else out
