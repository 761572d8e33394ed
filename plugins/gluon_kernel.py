"""Warp-specialized Hopper forward kernel of CLEAR attention, in Triton's Gluon (sm_90).

Same result as triton_kernel.clear_fwd_kernel; what differs is how blocks of keys reach the tensor cores:
- a program takes GROUPS query blocks of 64 rows (one consumer warpgroup each, GROUPS = 1 or 2) and visits
  the union of their key blocks once: every K and V block loaded serves 64 * GROUPS queries;
- a loader partition (one warp) streams those K and V blocks through TMA into a ring of STAGES
  shared-memory buffers (mbarriers "ready" / "empty" per buffer);
- the default partition (the consumer warpgroups) runs the online softmax on wgmma accumulators,
  issuing the next block's Q·Kᵀ asynchronously before it works on the current block's scores, so the
  tensor cores work while it exponentiates;
- the window mask of a partial block is one 64-bit word per query row and 64 keys (bit c: key c is
  visible), precomputed per (query block, key block) offset, loaded one block ahead. A key block of the
  union that one query block does not see gets all-zero words for that block's rows.
Blocks never straddle the text/image boundary and segments are whole blocks (the host checks it),
so no bounds are checked anywhere.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

# triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load (the old name raises)
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _item(p, text_items, image_items, HEADS, BH, TEXT_LEN, TEXT_START, IMAGE_LEN, IMAGE_START, U_COUNT, U_UNMASKED,
          BLOCK_N: gl.constexpr):
    """Program p's work: text-query programs of every (batch, head) first. Its group of query blocks (qgroup:
    the index among the segment's groups of GROUPS blocks), (batch, head), first query token, text key
    blocks, key blocks, and key blocks unmasked."""
    is_text = p < text_items * BH
    if is_text:
        q_start = TEXT_START
        qgroup = p % text_items
        pid_bh = p // text_items
    else:
        q_start = IMAGE_START
        qgroup = (p - text_items * BH) % image_items
        pid_bh = (p - text_items * BH) // image_items
    n_text_blocks = TEXT_LEN // BLOCK_N
    n_blocks = n_text_blocks + IMAGE_LEN // BLOCK_N
    n_unmasked = n_blocks  # text queries: every block unmasked
    if not is_text:
        n_blocks = n_text_blocks + gl.load(U_COUNT + qgroup)
        n_unmasked = gl.load(U_UNMASKED + qgroup)
    return is_text, qgroup, pid_bh, q_start, n_text_blocks, n_blocks, n_unmasked


@gluon.jit
def _key_block(i, is_text, qgroup, n_text_blocks, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N: gl.constexpr):
    """Token row (in the sequence) of the i-th key block this program visits. Order: text keys, then image
    keys (all of them for text queries; the program's union list for image queries)."""
    if i < n_text_blocks:
        row = TEXT_START + i * BLOCK_N
    elif is_text:
        row = IMAGE_START + (i - n_text_blocks) * BLOCK_N
    else:
        row = IMAGE_START + gl.load(U_INDEX + qgroup * width + i - n_text_blocks) * BLOCK_N
    return row


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, ready, empty, seq_row, col, q_row, is_text,
            qgroup, n_text_blocks, n_blocks, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr):
    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, col], q_ready, q_smem)
    for i in range(n_blocks):
        _load_key_block(i, k_desc, v_desc, k_bufs, v_bufs, ready, empty, seq_row, col, 0, is_text, qgroup,
                        n_text_blocks, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N, STAGES, False)


@gluon.jit
def _load_key_block(i, k_desc, v_desc, k_bufs, v_bufs, ready, empty, seq_row, col, v_row, is_text, qgroup,
                    n_text_blocks, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, V_T: gl.constexpr):
    """The i-th K and V blocks into ring buffer i % STAGES, once the consumer has given it back. ``V_T``: V is
    stored transposed, (batch * heads * head_dim, tokens), and its (batch, head) rows start at ``v_row`` (the FP8
    kernel: an 8-bit wgmma reads its B operand K-major only, and P·V's K is the keys)."""
    stage = i % STAGES
    # a fresh barrier counts as having completed the phase before phase 0: the first pass does not wait
    mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
    row = _key_block(i, is_text, qgroup, n_text_blocks, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N)
    mbarrier.expect(ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [seq_row + row, col], ready.index(stage), k_bufs.index(stage))
    if V_T:
        tma_load(v_desc, [v_row, row], ready.index(stage), v_bufs.index(stage))
    else:
        tma_load(v_desc, [seq_row + row, col], ready.index(stage), v_bufs.index(stage))


@gluon.jit
def _mask_words(i, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width, MASK_BITS, rows,
                GROUPS: gl.constexpr, WORDS: gl.constexpr):
    """Whether key block i needs the mask, and its words for these rows (low and high 64 keys; one word for
    64-key blocks): a table row (entry >= 0), every key (-1) or none (-2: not this query block's). Loaded
    one block ahead of their use, so the consumer never waits on them; nothing is read when unmasked."""
    j = i - n_text_blocks  # negative for text keys; text-query programs pass n_unmasked = every block
    masked = j >= n_unmasked
    entry = gl.load(U_ENTRY + (qgroup * width + j) * GROUPS + rows // 64, mask=(rows >= 0) & masked, other=-1)
    base = MASK_BITS + gl.maximum(entry, 0) * (64 * WORDS) + (rows % 64) * WORDS
    lo = gl.where(entry == -1, -1, gl.load(base, mask=entry >= 0, other=0))
    hi = lo
    if WORDS == 2:
        hi = gl.where(entry == -1, -1, gl.load(base + 1, mask=entry >= 0, other=0))
    return masked, lo, hi


@gluon.jit
def _softmax_start(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """A query block's row indices, each key column's bit in its mask word, which columns read the high word,
    a zero score block, and the running row max and sum before the first key block."""
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    col_bit = gl.full([BLOCK_N], 1, gl.int64, gl.SliceLayout(0, s_layout)) << (cols % 64).to(gl.int64)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    # m starts at a large finite negative value: a row with no visible key yet gives exp2(-inf) = 0, never NaN
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    return rows, col_bit, cols >= 64, s_zero, m_i, l_i


@gluon.jit
def _softmax_step(s, masked, lo, hi, col_bit, high_half, m_i, l_i, qk_scale, WORDS: gl.constexpr,
                  P_SHIFT: gl.constexpr):
    """Raw scores of one key block, masked by its words when it needs it: the block's probabilities
    (log2 units: the scale is folded into exp2's argument), the factor that rescales what came before,
    and the new row max and sum. ``P_SHIFT``: the probabilities are 2**P_SHIFT times larger (the row sum
    too, so the output is unchanged): an 8-bit P then keeps its small values out of the subnormals."""
    if masked:
        words = lo[:, None]
        if WORDS == 2:
            words = gl.where(high_half[None, :], hi[:, None], lo[:, None])
        s = gl.where((words & col_bit[None, :]) != 0, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    if P_SHIFT != 0:
        p = gl.exp2(s * qk_scale - (m_new - P_SHIFT)[:, None])
    else:
        p = gl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_ready, ready, empty, n_blocks, qk_scale, MASK_BITS, qgroup, n_text_blocks,
              n_unmasked, U_ENTRY, width, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, GROUPS: gl.constexpr, Q_IN_REGS: gl.constexpr, s_layout: gl.constexpr,
              o_layout: gl.constexpr):
    WORDS: gl.constexpr = BLOCK_N // 64
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    rows, col_bit, high_half, s_zero, m_i, l_i = _softmax_start(BLOCK_M, BLOCK_N, s_layout)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout))

    masked, lo, hi = _mask_words(n_blocks * 0, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width, MASK_BITS,
                                 rows, GROUPS, WORDS)
    mbarrier.wait(q_ready, 0)
    q = q_smem
    if Q_IN_REGS:  # Q as the register operand of Q·Kᵀ: the wgmmas then read K alone from shared memory
        q = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    # Block i: Q·Kᵀ of block i+1 runs on the tensor cores (and P·V of block i-1 finishes) while block i's
    # scores are exponentiated; then P·V of block i is issued and left running into the next iteration.
    for i in range(n_blocks - 1):
        nxt = (i + 1) % STAGES
        mbarrier.wait(ready.index(nxt), ((i + 1) // STAGES) & 1)
        s_next = warpgroup_mma(q, k_bufs.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        masked_next, lo_next, hi_next = _mask_words(i + 1, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width,
                                                    MASK_BITS, rows, GROUPS, WORDS)
        p, alpha, m_i, l_i = _softmax_step(s, masked, lo, hi, col_bit, high_half, m_i, l_i, qk_scale, WORDS, 0)
        s, acc = warpgroup_mma_wait(0, deps=(s_next, acc))
        # P·V of block i-1 is done: its buffers go back to the loader
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_bufs.index(i % STAGES), acc,
                            is_async=True)
        masked, lo, hi = masked_next, lo_next, hi_next
    last = n_blocks - 1
    p, alpha, m_i, l_i = _softmax_step(s, masked, lo, hi, col_bit, high_half, m_i, l_i, qk_scale, WORDS, 0)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_bufs.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc, m_i, l_i


@gluon.jit
def _store_rows(acc, m_i, l_i, O, LSE, o_offset, stride_on, lse_offset, token0, STORE_LSE: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Normalize a query block's accumulator and write its rows (from token0) of O, and of LSE (natural log,
    (batch * heads, tokens): the scores were in log2 units) when asked."""
    rows = gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    gl.store(O + o_offset + (token0 + rows)[:, None] * stride_on + cols[None, :], out.to(O.dtype.element_ty))
    if STORE_LSE:
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + lse_offset + token0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, s_layout)), lse)


@gluon.jit
def _query_block_buffers(q_desc, k_desc, v_desc, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """Shared memory of one consumer's query rows: Q with its barrier, and the ring of STAGES K and V buffers
    with their ready / empty barriers, initialized."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_block: gl.constexpr = v_desc.block_type.shape  # (BLOCK_N, HEAD_DIM), or transposed (the FP8 kernel's)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, v_block[0], v_block[1]], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    return q_smem, q_ready, k_bufs, v_bufs, ready, empty


@gluon.jit
def clear_fwd_ws_kernel(
    q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_on, stride_oh,
    TOKENS, HEADS, BH, TEXT_LEN, TEXT_START, IMAGE_LEN, IMAGE_START, qk_scale,
    U_COUNT, U_UNMASKED, U_INDEX, U_ENTRY, MASK_BITS, width, text_items, image_items,
    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, GROUPS: gl.constexpr,
    STORE_LSE: gl.constexpr, Q_IN_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = 64 * GROUPS
    # 1-D grid, text-query programs (the long ones) first, so they start at once
    is_text, qgroup, pid_bh, q_start, n_text_blocks, n_blocks, n_unmasked = _item(
        gl.program_id(0), text_items, image_items, HEADS, BH, TEXT_LEN, TEXT_START, IMAGE_LEN, IMAGE_START, U_COUNT,
        U_UNMASKED, BLOCK_N)
    b = pid_bh // HEADS
    h = pid_bh % HEADS

    q_smem, q_ready, k_bufs, v_bufs, ready, empty = _query_block_buffers(q_desc, k_desc, v_desc, BLOCK_M, BLOCK_N,
                                                                         HEAD_DIM, STAGES)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    acc, m_i, l_i = gl.warp_specialize([
        (_consumer, (q_smem, k_bufs, v_bufs, q_ready, ready, empty, n_blocks, qk_scale, MASK_BITS, qgroup,
                     n_text_blocks, n_unmasked, U_ENTRY, width, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, GROUPS, Q_IN_REGS,
                     s_layout, o_layout)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, ready, empty, b * TOKENS, h * HEAD_DIM,
                   b * TOKENS + q_start + qgroup * BLOCK_M, is_text, qgroup, n_text_blocks, n_blocks, U_INDEX, width,
                   TEXT_START, IMAGE_START, BLOCK_N, STAGES)),
    ], [1], [24])

    _store_rows(acc, m_i, l_i, O, LSE, b * stride_ob + h * stride_oh, stride_on, pid_bh * TOKENS,
                q_start + qgroup * BLOCK_M, STORE_LSE, s_layout, o_layout)
