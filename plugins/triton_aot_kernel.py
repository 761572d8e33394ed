"""Self-contained Triton forward kernel of CLEAR attention, for ahead-of-time use (TensorRT plugin,
AOTInductor): everything it needs comes from its arguments, which are all shapes, so a launch needs no
host-side tables and no Python.

Tile token layout only, one tile per program: a program takes one (th, tw) tile of image queries (edge
tiles smaller) and walks the box of key tiles within reach on the tile grid in one loop, masking every
block from token positions. (A walk that skipped tiles no query sees and left whole-visible tiles unmasked
branched per tile; on an H100 it was no faster with 4 warps, and slower with 8.) Text
queries attend to every key, image queries to every text key too, as in ``triton_kernel.py`` (whose
block helpers this kernel shares).

Arguments are in the order TensorRT's AOT plugins launch with: input tensors (q, k, v and the grid
carrier, a tensor whose shape is the image grid), scalar arguments, then the output tensor. Tensors are
contiguous (batch, tokens, heads, head_dim). Attributes of the call (radius, text position, tile,
scale) are compile-time constants.
"""

import triton
import triton.language as tl

from .triton_kernel import _attend_block, _attend_segment, _positions


@triton.jit
def _tile(t, GH, GW, TH: tl.constexpr, TW: tl.constexpr):
    """Tile ``t`` of the tile grid: its first token (tile order), token count, and row/column extents."""
    n_cols = (GW + TW - 1) // TW
    return _tile_at(t // n_cols, t % n_cols, GH, GW, TH, TW)


@triton.jit
def _tile_at(band, chunk, GH, GW, TH: tl.constexpr, TW: tl.constexpr):
    """The tile in row ``band``, column ``chunk`` of the tile grid, as ``_tile`` gives it."""
    band_h = tl.minimum(GH - band * TH, TH)
    chunk_w = tl.minimum(GW - chunk * TW, TW)
    start = band * TH * GW + chunk * band_h * TW
    y0 = band * TH
    x0 = chunk * TW
    return start, band_h * chunk_w, y0, y0 + band_h - 1, x0, x0 + chunk_w - 1


@triton.jit
def clear_fwd_aot_kernel(
    Q, K, V, GRID,  # input tensors; GRID only carries the image grid in its shape
    N, HEADS, BH, GH, GW,  # scalars: tokens, heads, batch * heads, image grid
    O,  # output tensor
    R2: tl.constexpr, REACH: tl.constexpr, QK_SCALE: tl.constexpr, TEXT_FIRST: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    SEGMENT_BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr = False,
):
    pid = tl.program_id(0)
    image_len = GH * GW
    text_len = N - image_len
    text_start = 0 if TEXT_FIRST else image_len
    image_start = text_len if TEXT_FIRST else 0
    text_blocks = (text_len + BLOCK_M - 1) // BLOCK_M
    n_rows = (GH + TH - 1) // TH
    n_cols = (GW + TW - 1) // TW
    stride_n = HEADS * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_M)  # key blocks are tiles too
    offs_d = tl.arange(0, HEAD_DIM)
    # text-query programs first (they are the long ones), as in the table-driven kernel
    n_text = text_blocks * BH
    is_text = pid < n_text
    tiles = n_rows * n_cols
    image_pid = tl.maximum(pid - n_text, 0)
    tile_start, tile_count, qy0, qy1, qx0, qx1 = _tile(image_pid % tiles, GH, GW, TH, TW)
    if is_text:
        block = pid % tl.maximum(text_blocks, 1)  # (no text: no text programs, but keep the division defined)
        pid_bh = pid // tl.maximum(text_blocks, 1)
        q_first = text_start + block * BLOCK_M
        q_count = tl.minimum(text_len - block * BLOCK_M, BLOCK_M)
    else:
        pid_bh = image_pid // tiles
        q_first = image_start + tile_start
        q_count = tile_count
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    base = b * N * stride_n + h * HEAD_DIM
    row_ok = offs_m < q_count
    q = tl.load(Q + base + (q_first + offs_m)[:, None] * stride_n + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * QK_SCALE).to(tl.float32 if UPCAST_DOT else q.dtype)
    k_text = K + base + text_start * stride_n
    v_text = V + base + text_start * stride_n
    k_img = K + base + image_start * stride_n
    v_img = V + base + image_start * stride_n

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attend_segment(acc, l_i, m_i, q, k_text, v_text, stride_n, stride_n, text_len, offs_d,
                                    SEGMENT_BLOCK_N, UPCAST_DOT)
    if is_text:
        acc, l_i, m_i = _attend_segment(acc, l_i, m_i, q, k_img, v_img, stride_n, stride_n, image_len, offs_d,
                                        SEGMENT_BLOCK_N, UPCAST_DOT)
    else:
        qy, qx = _positions(tile_start + tl.minimum(offs_m, q_count - 1), GH, GW, TH, TW, True)
        row_lo = tl.maximum(qy0 - REACH, 0) // TH
        row_hi = tl.minimum((qy1 + REACH) // TH, n_rows - 1)
        col_lo = tl.maximum(qx0 - REACH, 0) // TW
        col_hi = tl.minimum((qx1 + REACH) // TW, n_cols - 1)
        box_cols = col_hi - col_lo + 1
        # one branch-free loop over the box of key tiles, every block masked from token positions (tiles no
        # query sees are masked whole): a loop without branches is one Triton can pipeline
        for i in range(0, (row_hi - row_lo + 1) * box_cols):
            k_start, k_count, ky0, _, kx0, kx1 = _tile_at(row_lo + i // box_cols, col_lo + i % box_cols,
                                                          GH, GW, TH, TW)
            # the key tile's tokens in row order from its corner: row n // width, column n % width, without a
            # vector integer division (each one is a long instruction sequence per element, per block): n + 0.5
            # times 1 / width stays within 64 * 2**-23 of the exact quotient, at least 1 / (2 TW) from an integer
            width = kx1 - kx0 + 1
            row = ((offs_n.to(tl.float32) + 0.5) * (1.0 / width.to(tl.float32))).to(tl.int32)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_n, stride_n, k_start,
                                          k_start + k_count, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW, True, True,
                                          True, UPCAST_DOT, KY=ky0 + row, KX=kx0 + offs_n - row * width,
                                          KEY_POSITIONS=True)

    out = acc / l_i[:, None]
    tl.store(O + base + (q_first + offs_m)[:, None] * stride_n + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
