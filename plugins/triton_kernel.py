"""Triton forward kernel of CLEAR attention (block-sparse, online softmax).

One program = one block of BLOCK_M queries of one (batch, head). Blocks never straddle the
text/image boundary: each segment is cut into blocks on its own.
- text query block: every key (text, then image), dense (SEGMENT_BLOCK_N keys per step); only the
  ragged last block is masked.
- image query block: all text keys (dense), the extra keys if any (dense; HAS_EXTRA), then the image key
  blocks (BLOCK_N keys) listed for it: "full"
  blocks (inside every query's window: no mask evaluated) and "partial" blocks (window mask).
  Key blocks outside every window are never loaded. The ragged last image key block (when the
  image is not a multiple of BLOCK_N) is the only one with a bounds check: RAGGED says per query
  block whether to visit it.
Token (y, x) come from the index in raster or tile order, with the arithmetic of
layout.image_positions. UPCAST_DOT (host sets it only under TRITON_INTERPRET with bf16) feeds
the dots in fp32, because the interpreter's bf16 tl.dot is wrong (numpy has no bf16).
"""

import triton
import triton.language as tl


@triton.jit
def _positions(i, GH, GW, TH, TW, TILED: tl.constexpr, POSY=None, POSX=None, POS_TABLE: tl.constexpr = False):
    if POS_TABLE:  # several images, each on its own grid: (y, x) from tables
        return tl.load(POSY + i), tl.load(POSX + i)
    elif TILED:
        band = i // (TH * GW)
        band_h = tl.minimum(GH - band * TH, TH)
        j = i - band * TH * GW
        chunk = j // (band_h * TW)
        chunk_w = tl.minimum(GW - chunk * TW, TW)
        k = j - chunk * band_h * TW
        return band * TH + k // chunk_w, chunk * TW + k % chunk_w
    else:
        return i // GW, i % GW


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_seg, v_seg, stride_kn, stride_vn, start, limit, offs_n, offs_d,
                  qy, qx, R2, GH, GW, TH, TW,
                  MASK_BOUNDS: tl.constexpr, MASK_WINDOW: tl.constexpr, TILED: tl.constexpr,
                  UPCAST_DOT: tl.constexpr, TABLE=None, offs_m=None, MASK_TABLE: tl.constexpr = False,
                  BIAS=None, ADD_BIAS: tl.constexpr = False, POSY=None, POSX=None, POS_TABLE: tl.constexpr = False,
                  KY=None, KX=None, KEY_POSITIONS: tl.constexpr = False):
    """One key block. KEY_POSITIONS: the keys' (y, x) given (KY, KX), not derived from their token indices."""
    kn = start + offs_n
    # k is loaded as (BLOCK_N, HEAD_DIM) rows and transposed for the dot
    if MASK_BOUNDS:
        inside = kn < limit
        k = tl.load(k_seg + kn[:, None] * stride_kn + offs_d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(v_seg + kn[:, None] * stride_vn + offs_d[None, :], mask=inside[:, None], other=0.0)
    else:
        k = tl.load(k_seg + kn[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_seg + kn[:, None] * stride_vn + offs_d[None, :])
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k))  # q carries the softmax scale (log2 units)
    if MASK_TABLE:  # the window mask of this block pair, precomputed for its (query, key) block offset
        keep = tl.load(TABLE + offs_m[:, None] * offs_n.shape[0] + offs_n[None, :])
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_WINDOW:
        if KEY_POSITIONS:
            ky, kx = KY, KX
        else:
            ky, kx = _positions(tl.minimum(kn, limit - 1), GH, GW, TH, TW, TILED, POSY, POSX, POS_TABLE)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        s = tl.where(dy * dy + dx * dx <= R2, s, float("-inf"))  # R2: largest visible integer d²
    if MASK_BOUNDS:
        s = tl.where(inside[None, :], s, float("-inf"))
    if ADD_BIAS:  # text padding: this sample's bias per text key (log2 units; -inf: a hidden key)
        s = s + tl.load(BIAS + kn, mask=kn < limit, other=0.0)[None, :]
    # m starts at a large finite negative value, so fully masked rows give exp2(-inf) = 0, never NaN
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _attend_segment(acc, l_i, m_i, q, k_seg, v_seg, stride_kn, stride_vn, length, offs_d,
                    BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, BIAS=None, ADD_BIAS: tl.constexpr = False):
    """Every key of a segment: full blocks without any mask, then the ragged tail (ADD_BIAS: a bias per
    key added to its scores, the text padding)."""
    offs_n = tl.arange(0, BLOCK_N)
    full_end = (length // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_seg, v_seg, stride_kn, stride_vn, start, length,
                                      offs_n, offs_d, offs_n, offs_n, 0, 1, 1, 1, 1,
                                      False, False, False, UPCAST_DOT, BIAS=BIAS, ADD_BIAS=ADD_BIAS)
    if full_end < length:
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_seg, v_seg, stride_kn, stride_vn, full_end, length,
                                      offs_n, offs_d, offs_n, offs_n, 0, 1, 1, 1, 1,
                                      True, False, False, UPCAST_DOT, BIAS=BIAS, ADD_BIAS=ADD_BIAS)
    return acc, l_i, m_i


@triton.jit
def _attend_listed(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, image_len, offs_n, offs_d, qy, qx,
                   R2, GH, GW, TH, TW, COUNT, INDEX, width, block, BLOCK_N: tl.constexpr,
                   MASK_WINDOW: tl.constexpr, TILED: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   OFFSET=None, TABLE=None, offs_m=None, USE_TABLE: tl.constexpr = 0,
                   POSY=None, POSX=None, POS_TABLE: tl.constexpr = False):
    """The image key blocks listed for this query block (full ones unmasked, partial ones masked:
    from the mask table when the pair has a table entry, else computed from token positions).
    USE_TABLE: 0 no table, 1 some pairs have an entry (branch per block), 2 all pairs have one."""
    for i in range(0, tl.load(COUNT + block)):
        kb = tl.load(INDEX + block * width + i)
        if USE_TABLE == 2:  # every listed pair has a table entry: no branch, so the loads pipeline
            entry = tl.load(OFFSET + block * width + i)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, kb * BLOCK_N,
                                          image_len, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW,
                                          False, True, TILED, UPCAST_DOT, TABLE + entry * (offs_m.shape[0] * BLOCK_N),
                                          offs_m, True)
        elif USE_TABLE == 1:
            entry = tl.load(OFFSET + block * width + i)
            if entry >= 0:
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, kb * BLOCK_N,
                                              image_len, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW,
                                              False, True, TILED, UPCAST_DOT, TABLE + entry * (offs_m.shape[0] * BLOCK_N),
                                              offs_m, True)
            else:
                acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, kb * BLOCK_N,
                                              image_len, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW,
                                              False, True, TILED, UPCAST_DOT, POSY=POSY, POSX=POSX,
                                              POS_TABLE=POS_TABLE)
        else:
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, kb * BLOCK_N,
                                          image_len, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW,
                                          False, MASK_WINDOW, TILED, UPCAST_DOT, POSY=POSY, POSX=POSX,
                                          POS_TABLE=POS_TABLE)
    return acc, l_i, m_i


@triton.jit
def clear_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
    HEADS, BH, TEXT_LEN, TEXT_START, IMAGE_LEN, IMAGE_START, GH, GW, TH, TW, R2, qk_scale,
    FULL_COUNT, FULL_INDEX, PART_COUNT, PART_INDEX, RAGGED, max_full, max_part, text_q_blocks, image_q_blocks,
    PART_OFFSET, MASK_TABLE, LSE, Q_BLOCK_START,
    EK, EV, stride_ekb, stride_ekn, stride_ekh, stride_evb, stride_evn, stride_evh, EXTRA_LEN, TEXT_BIAS, POS_Y, POS_X,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEGMENT_BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILED: tl.constexpr,
    USE_TABLE: tl.constexpr = 0, UPCAST_DOT: tl.constexpr = False, STORE_LSE: tl.constexpr = False,
    HAS_EXTRA: tl.constexpr = False, TEXT_BIASED: tl.constexpr = False, POS_TABLE: tl.constexpr = False,
):
    # 1-D grid: the long text-query programs of every (batch, head) first, so they start at once
    # and overlap the short image-query programs instead of forming a tail at the end.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_text = text_q_blocks * BH
    is_text = pid < n_text
    if is_text:
        q_start = TEXT_START
        q_len = TEXT_LEN
        block = pid % text_q_blocks
        pid_bh = pid // text_q_blocks
    else:
        q_start = IMAGE_START
        q_len = IMAGE_LEN
        block = Q_BLOCK_START + (pid - n_text) % image_q_blocks  # a band's queries: the launched blocks only
        pid_bh = (pid - n_text) // image_q_blocks
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    rows = block * BLOCK_M + offs_m
    row_ok = rows < q_len
    q_ptr = Q + b * stride_qb + h * stride_qh + (q_start + rows)[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(tl.float32 if UPCAST_DOT else q.dtype)

    k_text = K + b * stride_kb + h * stride_kh + TEXT_START * stride_kn
    v_text = V + b * stride_vb + h * stride_vh + TEXT_START * stride_vn
    k_img = K + b * stride_kb + h * stride_kh + IMAGE_START * stride_kn
    v_img = V + b * stride_vb + h * stride_vh + IMAGE_START * stride_vn

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    acc, l_i, m_i = _attend_segment(acc, l_i, m_i, q, k_text, v_text, stride_kn, stride_vn, TEXT_LEN,
                                    offs_d, SEGMENT_BLOCK_N, UPCAST_DOT, TEXT_BIAS + b * TEXT_LEN, TEXT_BIASED)
    if is_text:
        acc, l_i, m_i = _attend_segment(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, IMAGE_LEN,
                                        offs_d, SEGMENT_BLOCK_N, UPCAST_DOT)
    else:
        if HAS_EXTRA:  # the extra keys (pooled image keys of the "down" variant): every one, image queries only
            acc, l_i, m_i = _attend_segment(acc, l_i, m_i, q, EK + b * stride_ekb + h * stride_ekh,
                                            EV + b * stride_evb + h * stride_evh, stride_ekn, stride_evn, EXTRA_LEN,
                                            offs_d, SEGMENT_BLOCK_N, UPCAST_DOT)
        qy, qx = _positions(tl.minimum(rows, IMAGE_LEN - 1), GH, GW, TH, TW, TILED, POS_Y, POS_X, POS_TABLE)
        acc, l_i, m_i = _attend_listed(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, IMAGE_LEN, offs_n,
                                       offs_d, qy, qx, R2, GH, GW, TH, TW, FULL_COUNT, FULL_INDEX, max_full, block,
                                       BLOCK_N, False, TILED, UPCAST_DOT)
        acc, l_i, m_i = _attend_listed(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, IMAGE_LEN, offs_n,
                                       offs_d, qy, qx, R2, GH, GW, TH, TW, PART_COUNT, PART_INDEX, max_part, block,
                                       BLOCK_N, True, TILED, UPCAST_DOT, PART_OFFSET, MASK_TABLE, offs_m, USE_TABLE,
                                       POS_Y, POS_X, POS_TABLE)
        if tl.load(RAGGED + block) != 0:
            last = (IMAGE_LEN // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_img, v_img, stride_kn, stride_vn, last,
                                          IMAGE_LEN, offs_n, offs_d, qy, qx, R2, GH, GW, TH, TW,
                                          True, True, TILED, UPCAST_DOT, POSY=POS_Y, POSX=POS_X, POS_TABLE=POS_TABLE)

    out = acc / l_i[:, None]
    o_ptr = O + b * stride_ob + h * stride_oh + (q_start + rows)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:  # natural log, (batch * heads, tokens): scores were in log2 units
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + pid_bh * (TEXT_LEN + IMAGE_LEN) + q_start + rows, lse, mask=row_ok)
