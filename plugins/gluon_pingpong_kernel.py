"""Ping-pong variant of the warp-specialized Hopper kernel (gluon_kernel.py), in Triton's Gluon (sm_90).

A program holds two consumer warpgroups, each on its own 64-row query block (work items 2p and 2p + 1 of
the one-block-per-program order: own key list, own ring of K/V buffers) and one loader warp feeding both
rings. The two warpgroups take turns issuing their wgmmas (FlashAttention-3's ping-pong): a pair of
mbarriers passes the turn, so one warpgroup's softmax runs while the other's GEMMs hold the tensor cores,
instead of two independent programs per SM overlapping by chance. Per warpgroup the loop is FA3's: issue
S_j = Q·K_jᵀ together with O += P_{j-1}·V_{j-1}, pass the turn, wait for S_j alone, softmax, then wait
for P·V and rescale. The mask words, key order and epilogue are gluon_kernel.py's.

With ``FP8`` the same kernel runs Q·Kᵀ and P·V in e4m3 (FlashAttention-3's recipe): Q, K and V arrive
quantized with one scale per (batch, head) (``DESCALE``: their factors back, (3, batch * heads) float32),
Q·Kᵀ's scale folds into the softmax's, P is quantized in registers (2**P_SHIFT times larger, so small
probabilities stay normal numbers) and V's scale multiplies the output, written in bf16. An 8-bit wgmma
reads its shared-memory operand K-major only, so V arrives transposed (gluon_kernel._load_key_block), its
keys in the order P's registers hold them (_p_operand).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .gluon_kernel import (
    _item,
    _load_key_block,
    _mask_words,
    _query_block_buffers,
    _softmax_start,
    _softmax_step,
    _store_rows,
    tma_load,
)


@gluon.jit
def _turn_wait(turn_mine, t, n_other, WHO: gl.constexpr):
    """Wait for this warpgroup's turn t. Warpgroup 0 goes first: its turn t follows the other's turn t - 1
    (a fresh barrier passes parity 1 at once); warpgroup 1's turn t follows warpgroup 0's turn t. Turns
    alternate, so a barrier is never more than one phase ahead of its waiter; once the other warpgroup
    has made its last turn (n_other + 1 of them: one per key block and a last P·V) nothing is waited for."""
    if WHO == 0:
        mbarrier.wait(turn_mine, (t & 1) ^ 1, pred=t <= n_other + 1)
    else:
        mbarrier.wait(turn_mine, t & 1, pred=t <= n_other)


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
    """P as P·V's register operand. 8-bit: its columns relabelled (fp8_quantize.p_register_order: within each
    32 keys, bits (g1, g0, q, b) of the key index become (g1, q, g0, b)) so that the conversion moves no data
    between threads; V's keys arrive in the same order."""
    if FP8:
        rows: gl.constexpr = p.shape[0]
        cols: gl.constexpr = p.shape[1]
        relabelled = gl.permute(gl.reshape(p.to(dtype), [rows, cols // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5))
        operand = gl.convert_layout(gl.reshape(relabelled, [rows, cols]), p_layout)
    else:
        operand = gl.convert_layout(p.to(dtype), p_layout)
    return operand


@gluon.jit
def _v_operand(v_bufs, stage, FP8: gl.constexpr):
    """P·V's B operand, (keys, head_dim): the buffer itself, or the FP8 kernel's transposed one turned back."""
    if FP8:
        operand = v_bufs.index(stage).permute((1, 0))
    else:
        operand = v_bufs.index(stage)
    return operand


@gluon.jit
def _pingpong_consumer(q_smem, k_bufs, v_bufs, q_ready, ready, empty, turn_mine, turn_other, n_blocks, n_other,
                       qk_scale, v_descale, MASK_BITS, qgroup, pid_bh, q_start, n_text_blocks, n_unmasked, U_ENTRY,
                       width, O, LSE, stride_ob, stride_on, stride_oh, HEADS, TOKENS, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, WHO: gl.constexpr,
                       FP8: gl.constexpr, OVERLAP: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    BLOCK_M: gl.constexpr = 64
    WORDS: gl.constexpr = BLOCK_N // 64
    P_SHIFT: gl.constexpr = 8 * FP8
    K_WIDTH: gl.constexpr = 2 + 2 * FP8  # register operands: elements per 32 bits (2 for 16-bit types, 4 for 8-bit)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=K_WIDTH)
    dtype: gl.constexpr = q_smem.dtype
    rows, col_bit, high_half, s_zero, m_i, l_i = _softmax_start(BLOCK_M, BLOCK_N, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    masked, lo, hi = _mask_words(n_blocks * 0, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width, MASK_BITS, rows,
                                 1, WORDS)
    mbarrier.wait(q_ready, 0)
    q = q_smem  # OVERLAP: read from shared memory by every wgmma (its registers would not fit beside a second S)
    if not OVERLAP:
        q = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=K_WIDTH))
    mbarrier.wait(ready.index(0), 0)
    t = n_blocks * 0
    _turn_wait(turn_mine, t, n_other, WHO)
    s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if OVERLAP:  # S of block 1 as well (of block 0 again where there is no block 1: unused)
        nxt = gl.minimum(n_blocks * 0 + 1, n_blocks - 1)
        mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_next = warpgroup_mma(q, k_bufs.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    t += 1
    s = warpgroup_mma_wait(1 * OVERLAP, deps=(s, ))
    masked_next, lo_next, hi_next = _mask_words(n_blocks * 0 + 1, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width,
                                                MASK_BITS, rows, 1, WORDS)
    p, alpha, m_i, l_i = _softmax_step(s, masked, lo, hi, col_bit, high_half, m_i, l_i, qk_scale, WORDS, P_SHIFT)
    masked, lo, hi = masked_next, lo_next, hi_next
    if OVERLAP:
        s = warpgroup_mma_wait(0, deps=(s_next, ))
    for j in range(1, n_blocks):
        nxt = j
        if OVERLAP:
            nxt = gl.minimum(j + 1, n_blocks - 1)  # the last turn's S is the last block's again, unused
        mbarrier.wait(ready.index(nxt % STAGES), (nxt // STAGES) & 1)
        _turn_wait(turn_mine, t, n_other, WHO)
        if OVERLAP:  # P·V of block j-1, then S of block j+1: both run while block j's scores go through the softmax
            acc_tok = warpgroup_mma(_p_operand(p, dtype, p_layout, FP8), _v_operand(v_bufs, (j - 1) % STAGES, FP8),
                                    acc, is_async=True)
            s_tok = warpgroup_mma(q, k_bufs.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
        else:  # S of block j, then P·V of block j-1; the softmax waits for S alone
            s_tok = warpgroup_mma(q, k_bufs.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            acc_tok = warpgroup_mma(_p_operand(p, dtype, p_layout, FP8), _v_operand(v_bufs, (j - 1) % STAGES, FP8),
                                    acc, is_async=True)
        mbarrier.arrive(turn_other, count=1)
        t += 1
        if not OVERLAP:
            s = warpgroup_mma_wait(1, deps=(s_tok, ))  # S_j is done; P·V of block j-1 may still run
        masked_next, lo_next, hi_next = _mask_words(j + 1, qgroup, n_text_blocks, n_unmasked, U_ENTRY, width,
                                                    MASK_BITS, rows, 1, WORDS)
        p, alpha, m_i, l_i = _softmax_step(s, masked, lo, hi, col_bit, high_half, m_i, l_i, qk_scale, WORDS,
                                           P_SHIFT)
        if OVERLAP:  # both finished before S is carried on: reading a running wgmma's registers serializes them
            acc, s = warpgroup_mma_wait(0, deps=(acc_tok, s_tok))
        else:
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(empty.index((j - 1) % STAGES), count=1)  # block j-1's buffers back to the loader
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        masked, lo, hi = masked_next, lo_next, hi_next
    _turn_wait(turn_mine, t, n_other, WHO)
    acc_tok = warpgroup_mma(_p_operand(p, dtype, p_layout, FP8), _v_operand(v_bufs, (n_blocks - 1) % STAGES, FP8),
                            acc, is_async=True)
    mbarrier.arrive(turn_other, count=1)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    mbarrier.arrive(empty.index((n_blocks - 1) % STAGES), count=1)
    if FP8:  # V's scale back; the row max in unshifted units for the log-sum-exp
        acc = acc * v_descale
        m_i = m_i - P_SHIFT
    _store_rows(acc, m_i, l_i, O, LSE, (pid_bh // HEADS) * stride_ob + (pid_bh % HEADS) * stride_oh, stride_on,
                pid_bh * TOKENS, q_start + qgroup * BLOCK_M, STORE_LSE, s_layout, o_layout)


@gluon.jit
def _pingpong_loader(q_desc, k_desc, v_desc, q0, k0, v0, qr0, ready0, empty0, q1, k1, v1, qr1, ready1, empty1,
                     row_q0, row_q1, seq0, seq1, col0, col1, vrow0, vrow1, text0, text1, g0, g1, nt, n0, n1, U_INDEX,
                     width, TEXT_START, IMAGE_START, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr):
    mbarrier.expect(qr0, q_desc.block_type.nbytes)
    tma_load(q_desc, [row_q0, col0], qr0, q0)
    mbarrier.expect(qr1, q_desc.block_type.nbytes)
    tma_load(q_desc, [row_q1, col1], qr1, q1)
    # both rings block by block, in the order the warpgroups take turns
    for i in range(gl.maximum(n0, n1)):
        if i < n0:
            _load_key_block(i, k_desc, v_desc, k0, v0, ready0, empty0, seq0, col0, vrow0, text0, g0, nt, U_INDEX,
                            width, TEXT_START, IMAGE_START, BLOCK_N, STAGES, FP8)
        if i < n1:
            _load_key_block(i, k_desc, v_desc, k1, v1, ready1, empty1, seq1, col1, vrow1, text1, g1, nt, U_INDEX,
                            width, TEXT_START, IMAGE_START, BLOCK_N, STAGES, FP8)


@gluon.jit
def clear_fwd_pingpong_kernel(
    q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_on, stride_oh,
    TOKENS, HEADS, BH, TEXT_LEN, TEXT_START, IMAGE_LEN, IMAGE_START, qk_scale,
    U_COUNT, U_UNMASKED, U_INDEX, U_ENTRY, MASK_BITS, width, text_items, image_items, DESCALE,
    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr,
    num_warps: gl.constexpr, FP8: gl.constexpr = False, OVERLAP: gl.constexpr = False,
):
    # the host launches half as many programs as work items (an even number of them)
    p0 = 2 * gl.program_id(0)
    text0, g0, bh0, start0, nt, n0, u0 = _item(p0, text_items, image_items, HEADS, BH, TEXT_LEN, TEXT_START,
                                               IMAGE_LEN, IMAGE_START, U_COUNT, U_UNMASKED, BLOCK_N)
    text1, g1, bh1, start1, nt, n1, u1 = _item(p0 + 1, text_items, image_items, HEADS, BH, TEXT_LEN, TEXT_START,
                                               IMAGE_LEN, IMAGE_START, U_COUNT, U_UNMASKED, BLOCK_N)
    q0, qr0, k0, v0, ready0, empty0 = _query_block_buffers(q_desc, k_desc, v_desc, 64, BLOCK_N, HEAD_DIM, STAGES)
    q1, qr1, k1, v1, ready1, empty1 = _query_block_buffers(q_desc, k_desc, v_desc, 64, BLOCK_N, HEAD_DIM, STAGES)
    turn0 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(turn0, count=1)
    mbarrier.init(turn1, count=1)
    scale0 = qk_scale
    scale1 = qk_scale
    vscale0 = 1.0
    vscale1 = 1.0
    if FP8:  # Q·Kᵀ's factors fold into the softmax's scale; V's multiplies the output
        scale0 = qk_scale * gl.load(DESCALE + bh0) * gl.load(DESCALE + BH + bh0)
        scale1 = qk_scale * gl.load(DESCALE + bh1) * gl.load(DESCALE + BH + bh1)
        vscale0 = gl.load(DESCALE + 2 * BH + bh0)
        vscale1 = gl.load(DESCALE + 2 * BH + bh1)
    K_INSTR: gl.constexpr = 16 + 16 * FP8  # a wgmma's K: 32 bytes of its operands
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, K_INSTR])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, K_INSTR])
    gl.warp_specialize([
        (_pingpong_consumer, (q0, k0, v0, qr0, ready0, empty0, turn0, turn1, n0, n1, scale0, vscale0, MASK_BITS, g0,
                              bh0, start0, nt, u0, U_ENTRY, width, O, LSE, stride_ob, stride_on, stride_oh, HEADS,
                              TOKENS, BLOCK_N, HEAD_DIM, STAGES, STORE_LSE, 0, FP8, OVERLAP, s_layout, o_layout)),
        (_pingpong_consumer, (q1, k1, v1, qr1, ready1, empty1, turn1, turn0, n1, n0, scale1, vscale1, MASK_BITS, g1,
                              bh1, start1, nt, u1, U_ENTRY, width, O, LSE, stride_ob, stride_on, stride_oh, HEADS,
                              TOKENS, BLOCK_N, HEAD_DIM, STAGES, STORE_LSE, 1, FP8, OVERLAP, s_layout, o_layout)),
        (_pingpong_loader, (q_desc, k_desc, v_desc, q0, k0, v0, qr0, ready0, empty0, q1, k1, v1, qr1, ready1, empty1,
                            (bh0 // HEADS) * TOKENS + start0 + g0 * 64, (bh1 // HEADS) * TOKENS + start1 + g1 * 64,
                            (bh0 // HEADS) * TOKENS, (bh1 // HEADS) * TOKENS, (bh0 % HEADS) * HEAD_DIM,
                            (bh1 % HEADS) * HEAD_DIM, bh0 * HEAD_DIM, bh1 * HEAD_DIM, text0, text1, g0, g1, nt, n0,
                            n1, U_INDEX, width, TEXT_START, IMAGE_START, BLOCK_N, STAGES, FP8)),
    ], [4, 1], [240, 24])
