"""Q, K and V to e4m3 with one scale per (batch, head), for the FP8 attention kernel: two Triton passes over
the tensor (the largest magnitude of each head, then scale and round), the 8-bit result written once, V's
already transposed for the FP8 P·V. In PyTorch the same took six kernels and two bf16 copies per tensor
(about 6 ms at 4096², FLUX shapes, on an H100 — longer than the FP8 attention kernel's image rows).

``quantize_per_head`` is the same arithmetic in PyTorch: the reference the kernels are tested against, and
what the FP8 emulation uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value
TOKENS_PER_PROGRAM = 64
KEY_BLOCK = 64  # the FP8 kernel's keys per block: V's keys are reordered within aligned blocks of this many


def p_register_order(block: int = KEY_BLOCK) -> torch.Tensor:
    """Where key c of an aligned key block sits in the FP8 kernel's P operand: column order(c). Q·Kᵀ leaves
    each thread two adjacent keys of every 8; the 8-bit wgmma wants four adjacent keys of every 16 from it.
    The kernel relabels P's columns so that the registers a thread holds already are its operand (no
    shuffles: gluon_pingpong_kernel._p_operand, a reshape and permute of the key index's bits), and V's keys
    are stored in the same order, which leaves P·V unchanged. Bits of c, low to high: b, q (2), g0, g1,
    higher; of order(c): b, g0, q (2), g1, higher."""
    c = torch.arange(block)
    return (c >> 5 << 5) | (((c >> 4) & 1) << 4) | (((c >> 1) & 3) << 2) | (((c >> 3) & 1) << 1) | (c & 1)


def value_operand(v8: torch.Tensor) -> torch.Tensor:
    """V (batch, tokens, heads, head_dim) as the FP8 kernel reads it: (batch * heads * head_dim, tokens), the
    keys of each whole aligned block of KEY_BLOCK in p_register_order (a partial last block as it is)."""
    batch, tokens, heads, head_dim = v8.shape
    flat = v8.permute(0, 2, 3, 1).reshape(batch * heads * head_dim, tokens)
    whole = tokens - tokens % KEY_BLOCK
    columns = torch.arange(tokens, device=v8.device)
    order = p_register_order().to(v8.device)
    columns[:whole] = (columns[:whole] // KEY_BLOCK * KEY_BLOCK) + order.repeat(whole // KEY_BLOCK)
    out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)  # contiguous (empty_like keeps a view's strides)
    out[:, columns] = flat
    return out


def quantize_per_head(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in e4m3 with one scale per (batch, head) so that its largest magnitude is E4M3_MAX, the factors back:
    (batch * heads,) float32). ``t``: (batch, tokens, heads, head_dim). Scaled in float32, rounded once."""
    amax = torch.maximum(t.amax(dim=(1, 3)), -t.amin(dim=(1, 3))).float()
    factor, inverse = scales(amax)
    quantized = (t.float() * inverse.view(t.shape[0], 1, t.shape[2], 1)).to(E4M3)
    return quantized, factor.flatten()


def scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, its inverse) of each head's largest magnitude: amax / E4M3_MAX and E4M3_MAX / amax, computed
    once here so that kernel and reference agree. A head below 2**-64 (zeros) is scaled as if its largest
    magnitude were 2**-64: both factors stay finite (0 times an infinite inverse would be NaN)."""
    amax = amax.clamp_min(2.0**-64)
    # divided by a tensor, not a Python number: on a GPU, PyTorch divides by a CPU scalar as a product with its
    # float reciprocal (one bit off the quotient at times), where the CPU divides exactly
    return amax / torch.full_like(amax, E4M3_MAX), E4M3_MAX / amax


@triton.jit
def _head_amax_kernel(X, AMAX, TOKENS, HEADS, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    bh, chunk = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    rows = chunk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    offsets = ((b * TOKENS + rows[:, None]) * HEADS + h) * HEAD_DIM + cols[None, :]
    x = tl.load(X + offsets, mask=rows[:, None] < TOKENS, other=0.0).to(tl.float32)
    tl.atomic_max(AMAX + bh, tl.max(tl.max(tl.abs(x), 1), 0))  # magnitudes: float order is integer order


@triton.jit
def _scale_kernel(X, INVERSE, OUT, TOKENS, HEADS, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    bh, chunk = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    rows = chunk * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    inside = rows[:, None] < TOKENS
    offsets = ((b * TOKENS + rows[:, None]) * HEADS + h) * HEAD_DIM + cols[None, :]
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    quantized = (x * tl.load(INVERSE + bh)).to(OUT.dtype.element_ty)
    if TRANSPOSED:  # (batch * heads * head_dim, tokens), keys in P's register order: the FP8 kernel's V
        c = rows % 64
        order = (c & 48) | (((c >> 1) & 3) << 2) | (((c >> 3) & 1) << 1) | (c & 1)  # p_register_order
        whole = (rows // 64 + 1) * 64 <= TOKENS
        column = tl.where(whole, rows - c + order, rows)
        offsets = (bh * HEAD_DIM + cols[None, :]) * TOKENS + column[:, None]
    tl.store(OUT + offsets, quantized, mask=inside)


def quantize_heads(t: torch.Tensor, transposed: bool = False, dtype: torch.dtype = E4M3
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_head by the two Triton passes. ``transposed``: the result laid out as value_operand
    (the FP8 kernel's V). ``dtype``: what the scaled values are rounded to (float32 keeps
    them as they are: Triton's CPU interpreter rounds some values to e4m3 a power of two low, so the CPU tests
    compare the scaled values and the GPU test the e4m3 bytes)."""
    batch, tokens, heads, head_dim = t.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"quantize_heads: head_dim must be a power of two of at least 16, got {head_dim}")
    t = t.contiguous()
    amax = torch.zeros(batch * heads, dtype=torch.float32, device=t.device)
    grid = (batch * heads, triton.cdiv(tokens, TOKENS_PER_PROGRAM))
    _head_amax_kernel[grid](t, amax, tokens, heads, head_dim, TOKENS_PER_PROGRAM)
    factor, inverse = scales(amax)
    shape = (batch * heads * head_dim, tokens) if transposed else t.shape
    out = torch.empty(shape, dtype=dtype, device=t.device)
    _scale_kernel[grid](t, inverse, out, tokens, heads, head_dim, TOKENS_PER_PROGRAM, transposed)
    return out, factor
