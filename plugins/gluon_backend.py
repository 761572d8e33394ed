"""Gluon backend of clear::attention: the warp-specialized Hopper kernels, host side. By default the
ping-pong kernel (gluon_pingpong_kernel.py: two consumer warpgroups per program taking turns); the
one-warpgroup kernel (gluon_kernel.py) where ping-pong cannot run, and for the other program shapes.

It runs the calls of a diffusion transformer's common case on an sm_90 GPU: one image, text and image
segments of whole 64-token blocks, every partial block pair's window mask in the mask table (the tile
token layout, or raster rows of whole blocks), no pooled keys. ``gluon_reason`` says why not
otherwise; the chooser then takes the Triton kernel. Forward only; the backward is FlexAttention's,
as for the Triton backend.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .layout import TokenLayout
from .triton_backend import image_block_lists, output_buffer, use_mask_table

try:  # the Gluon Hopper API this kernel is written against: triton 3.6 (the H200's) to 3.9 (CI's) compile it
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_kernel import clear_fwd_ws_kernel
    from .gluon_pingpong_kernel import clear_fwd_pingpong_kernel
except (ImportError, AttributeError):  # pragma: no cover - machines without triton or with an older one
    clear_fwd_ws_kernel = clear_fwd_pingpong_kernel = None

MIN_TRITON = (3, 6)
# read once: the version check is part of every call's gluon_reason
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2]) if clear_fwd_ws_kernel else (0, 0)

BLOCK = 64  # query rows per consumer warpgroup, and keys per block
BLOCK_NS = (64, 128)  # keys per block the kernel takes (128: whole 8x16 tiles)
# (stages of 64-key K/V buffers, maxnreg) per query blocks per program: with one, two programs share an SM
# (shared memory: Q 16 KB + 3 x 32 KB each); with two, one program has the SM (Q 32 KB + 4 x 32 KB).
# At least 3 stages, or the loader waits on a buffer the consumer still holds; 128-key blocks: 3 (64 KB each).
PROGRAM = {1: (3, 128), 2: (4, 168)}
# Query blocks per program by default: one. Two (each K/V block loaded once for 128 queries, one program per
# SM) measured slower on an H200 (recipes/benchmarks/h200-run13-gluon): loads are not what limits the kernel.
GROUPS = 1
# The ping-pong kernel (two consumer warpgroups taking turns on the tensor cores, one program per SM: Q 2 x 16 KB
# + 2 rings of 3 x 32 KB) measured 1.06x (8192²) to 1.10x (4096²) faster than two programs per SM of the plain
# one (recipes/benchmarks/h200-run14-distill-pingpong): the default wherever it applies (see pingpong_reason).
PINGPONG = True
PINGPONG_PROGRAM = (3, 168)
HEAD_DIMS = (64, 128)
GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}  # the inputs' dtypes the kernels take
GL_OPERANDS = {**GL_DTYPES, torch.float8_e4m3fn: "float8e4nv"}  # and their tensor-core operands (gluon-fp8's)


def stages_for(groups: int, block_n: int) -> int:
    return PROGRAM[groups][0] if block_n == 64 else 3


def layout_reason(layout: TokenLayout, radius: float, device: torch.device, groups: int | None = None,
                  block_n: int = BLOCK) -> str | None:
    """Why the kernel's block structure cannot express this call's layout (None: it can)."""
    groups = groups or GROUPS
    if block_n not in BLOCK_NS or groups not in PROGRAM:
        return f"block_n {block_n}, groups {groups} (supported: {BLOCK_NS}, {tuple(PROGRAM)})"
    if layout.extra_keys:
        return "no extra (pooled) keys"
    if layout.images:
        return "one image per sequence"
    rows = max(block_n, BLOCK * groups)
    if layout.text_len % rows or layout.image_tokens % rows:
        return f"text ({layout.text_len}) and image ({layout.image_tokens}) tokens must be multiples of {rows}"
    if not use_mask_table():
        return "needs the mask table (CLEAR_MASK_TABLE=0 is set)"
    if group_lists(layout.height, layout.width, layout.tile, float(radius), device, groups, block_n) is None:
        return (f"some partial block pairs have no precomputed window mask (raster order with a width that is "
                f"not a multiple of {block_n}, or tiles that {block_n}-key blocks do not fill): use the tile "
                f"token layout")
    return None


def gluon_reason(q, k, v, layout: TokenLayout, radius: float, scale=None, *, groups: int | None = None,
                 block_n: int = BLOCK) -> str | None:
    """Why the warp-specialized kernel cannot run this call (None: it can); shared by the chooser and the
    forward's own check."""
    if clear_fwd_ws_kernel is None:
        return "triton's Gluon Hopper API is not available"
    if TRITON_VERSION < MIN_TRITON:
        return f"triton {triton.__version__} (the kernel is written for Gluon as of triton 3.6)"
    if q.device.type != "cuda":
        return f"needs a CUDA device, got {q.device.type}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability[0] != 9:
        return f"needs a Hopper GPU (sm_90: wgmma), got sm_{capability[0]}{capability[1]}"
    if q.dtype not in GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (bf16 and fp16 only)"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (supported: {HEAD_DIMS}, same for v)"
    return layout_reason(layout, radius, q.device, groups, block_n)


def pingpong_reason(layout: TokenLayout, batch_heads: int, groups: int, block_n: int, q_in_regs: bool,
                    stages: int | None, queries: str = "all") -> str | None:
    """Why the ping-pong kernel cannot take this call (None: it can): it pairs 64-row query blocks with
    their own 64-key lists, Q in registers, and needs an even number of them (two per program) among the
    ``queries`` it computes (all, text or image)."""
    if (groups, block_n, q_in_regs, stages or PINGPONG_PROGRAM[0]) != (1, BLOCK, True, PINGPONG_PROGRAM[0]):
        return (f"ping-pong runs one query block per warpgroup over {BLOCK}-key blocks with Q in registers and "
                f"{PINGPONG_PROGRAM[0]} stages (got groups={groups}, block_n={block_n}, q_in_regs={q_in_regs}, "
                f"stages={stages})")
    rows = {"all": layout.text_len + layout.image_tokens, "text": layout.text_len, "image": layout.image_tokens}
    if rows[queries] // BLOCK * batch_heads % 2:
        return "ping-pong needs an even number of 64-row query blocks over batch and heads"
    return None


class GroupLists(NamedTuple):
    """Per program (GROUPS consecutive 64-row image query blocks): the union of their image key blocks, those
    no block needs masked first; per listed block and query block, its mask: a table row of ``words``,
    -1 (every key visible) or -2 (not one of this query block's)."""

    count: torch.Tensor  # (programs,) int32
    unmasked: torch.Tensor  # (programs,) int32: the first `unmasked` listed blocks need no mask
    index: torch.Tensor  # (programs, width) int32 key block
    entry: torch.Tensor  # (programs, width, groups) int32
    words: torch.Tensor  # (table rows, 64 * block_n / 64) int64: bit c of word j of a row: key 64 j + c visible


@functools.lru_cache(maxsize=64)
def group_lists(height: int, width: int, tile, radius: float, device: torch.device, groups: int = 1,
                block_n: int = BLOCK) -> GroupLists | None:
    """The kernel's lists, built from the Triton kernel's per-block lists and mask table (same blocks, same
    table); None when some partial pair has no table entry."""
    lists = image_block_lists(height, width, tile, radius, BLOCK, block_n, device)
    if lists.part_count.any() and lists.table_mode != 2:
        return None
    n_q, n_k = lists.full_count.numel(), height * width // block_n
    entry = torch.full((n_q, n_k + 1), -2, dtype=torch.int32, device=device)  # column n_k: padding slots
    for count, index, value in ((lists.full_count, lists.full_index, None),
                                (lists.part_count, lists.part_index, lists.table_entries)):
        listed = torch.arange(index.shape[1], device=device)[None, :] < count[:, None]
        where = torch.where(listed, index.long(), n_k)
        entry.scatter_(1, where, -1 if value is None else torch.where(listed, value, -2))
    entry = entry[:, :n_k].reshape(n_q // groups, groups, n_k)
    seen = (entry != -2).any(1)
    plain = (entry == -1).all(1) & seen
    count = seen.sum(1, dtype=torch.int32)
    span = max(int(count.max()), 1)
    # listed blocks first, unmasked ones before masked ones, each in key order
    order = torch.argsort(-(seen.to(torch.int8) + plain.to(torch.int8)), dim=1, stable=True)[:, :span]
    chosen = entry.gather(2, order[:, None, :].expand(-1, groups, -1)).transpose(1, 2)
    table = lists.mask_table.to(torch.int64).unflatten(-1, (block_n // 64, 64))
    bits = torch.arange(64, device=device, dtype=torch.int64)
    # distinct powers of two: the sum is the bitwise or (bit 63 wraps to the sign bit, as intended)
    words = (table << bits).sum(-1).flatten(1).contiguous()
    # one more column than the longest list: a consumer reads the entry of the block after its last one ahead
    # of time, which must stay inside the table (-2: nothing to read) also where a list is full (a radius
    # beyond the grid, every block listed); and a words table of at least one row to point at
    order = torch.cat([order, order.new_zeros(order.shape[0], 1)], 1)
    chosen = torch.cat([chosen, chosen.new_full((chosen.shape[0], 1, groups), -2)], 1)
    if not len(words):
        words = words.new_zeros(1, words.shape[1])
    return GroupLists(count, plain.sum(1, dtype=torch.int32), order.to(torch.int32).contiguous(),
                      chosen.contiguous(), words)


def descriptor(flat: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of ``block``-shaped blocks over a contiguous 2-D tensor."""
    layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, GL_OPERANDS[flat.dtype]))
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), block, layout)


def token_descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """``rows`` tokens of one head per block, over (batch * tokens, heads * head_dim) of a contiguous (B, N, H, D)
    tensor."""
    return descriptor(t.view(t.shape[0] * t.shape[1], t.shape[2] * t.shape[3]), [rows, t.shape[3]])


def kernel_arguments(descriptors: tuple, out: torch.Tensor, lse: torch.Tensor, layout: TokenLayout, lists: GroupLists,
                     qk_scale: float, text_items: int, image_items: int) -> tuple:
    """The arguments both kernels take, in order, up to their work-item counts (``text_items``, ``image_items``:
    query groups per (batch, head) in each segment; 0 text items: image queries only)."""
    batch, tokens, heads = out.shape[:3]
    return (*descriptors, out, lse, out.stride(0), out.stride(1), out.stride(2), tokens, heads, batch * heads,
            layout.text_len, 0 if layout.text_first else layout.image_tokens, layout.image_tokens, layout.image_start,
            qk_scale, lists.count, lists.unmasked, lists.index, lists.entry, lists.words, lists.index.shape[1],
            text_items, image_items)


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The kernels' score scale: the attention scale in log2 units (their softmax uses exp2)."""
    return (scale if scale is not None else head_dim ** -0.5) * 1.4426950408889634


def gluon_clear_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                          extra=None, text_bias=None, out: torch.Tensor | None = None, return_lse: bool = False,
                          groups: int | None = None, block_n: int = BLOCK, stages: int | None = None,
                          q_in_regs: bool = True, pingpong: bool | None = None, queries: str = "all",
                          lse: torch.Tensor | None = None, overlap: bool = False):
    """Same signature and result as reference_attention (inference forward) for the features the backend
    declares (no pooled keys, no text bias: the chooser sends those calls elsewhere). ``groups``: 64-row query
    blocks per program (default: GROUPS); ``block_n``: keys per block (BLOCK_NS); ``stages``: K/V buffers (default: PROGRAM);
    ``q_in_regs``: Q as the register operand of Q·Kᵀ (else read from shared memory by every wgmma);
    ``pingpong``: the ping-pong kernel (None: wherever pingpong_reason allows, if PINGPONG; True: required).
    ``queries="text"``: the text queries' rows alone (of ``out`` and ``lse``, given: the FP8 backend's other half).
    ``overlap``: the ping-pong kernel's variant that also overlaps each warpgroup's softmax with its own next Q·Kᵀ
    (two S tiles per warpgroup, Q read from shared memory); an option to measure, not the default."""
    if extra is not None or text_bias is not None:
        raise ValueError("gluon backend: does not support pooled_keys or text_bias (choose_backend sends such calls "
                         "to a backend that declares them)")
    if queries not in ("all", "text"):
        raise ValueError(f"gluon backend: queries must be 'all' or 'text', got {queries!r}")
    groups = groups or GROUPS
    reason = gluon_reason(q, k, v, layout, radius, groups=groups, block_n=block_n)
    batch, tokens, heads, head_dim = q.shape
    not_pingpong = pingpong_reason(layout, batch * heads, groups, block_n, q_in_regs, stages, queries)
    if pingpong and not_pingpong and not reason:
        reason = not_pingpong
    if reason:
        raise ValueError(f"gluon backend: {reason}")
    pingpong = (PINGPONG if pingpong is None else pingpong) and not not_pingpong
    if overlap and not pingpong:
        raise ValueError(f"gluon backend: overlap is a variant of the ping-pong kernel, which cannot run this call "
                         f"({not_pingpong or 'pingpong=False'})")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = output_buffer(q, out)
    lists = group_lists(layout.height, layout.width, layout.tile, float(radius), q.device, groups, block_n)
    rows = BLOCK * groups
    if lse is None:
        lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device) if return_lse else out
    text_items, image_items = layout.text_len // rows, layout.image_tokens // rows
    items = (text_items + (image_items if queries == "all" else 0)) * batch * heads  # text items come first
    args = kernel_arguments((token_descriptor(q, rows), token_descriptor(k, block_n), token_descriptor(v, block_n)),
                            out, lse, layout, lists, softmax_scale(scale, head_dim), text_items, image_items)
    if items and pingpong:  # two work items per program; 4 warps of the default partition + 4 + 1 of the workers
        stages, maxnreg = PINGPONG_PROGRAM
        clear_fwd_pingpong_kernel[(items // 2,)](*args, lists.count, BLOCK_N=block_n, HEAD_DIM=head_dim,  # no DESCALE
                                                 STAGES=stages, STORE_LSE=return_lse, num_warps=4, maxnreg=maxnreg,
                                                 OVERLAP=overlap)
    elif items:
        clear_fwd_ws_kernel[(items,)](
            *args, BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages or stages_for(groups, block_n), GROUPS=groups,
            STORE_LSE=return_lse, Q_IN_REGS=q_in_regs,
            num_warps=4 * groups, maxnreg=PROGRAM[groups][1],  # a consumer warpgroup per query block, plus the loader
        )
    return (out, lse.transpose(1, 2)) if return_lse else out
