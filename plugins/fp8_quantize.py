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
    return amax / E4M3_MAX, E4M3_MAX / amax


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
    if TRANSPOSED:  # (batch * heads * head_dim, tokens): the FP8 kernel's V
        offsets = (bh * HEAD_DIM + cols[None, :]) * TOKENS + rows[:, None]
    tl.store(OUT + offsets, quantized, mask=inside)


def quantize_heads(t: torch.Tensor, transposed: bool = False, dtype: torch.dtype = E4M3
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_head by the two Triton passes. ``transposed``: the result as (batch * heads * head_dim,
    tokens), one row per (batch, head, channel). ``dtype``: what the scaled values are rounded to (float32 keeps
    them as they are: Triton's CPU interpreter rounds some values to e4m3 a power of two low, so the CPU tests
    compare the scaled values and the GPU test the e4m3 bytes)."""
    batch, tokens, heads, head_dim = t.shape
    t = t.contiguous()
    amax = torch.zeros(batch * heads, dtype=torch.float32, device=t.device)
    grid = (batch * heads, triton.cdiv(tokens, TOKENS_PER_PROGRAM))
    _head_amax_kernel[grid](t, amax, tokens, heads, head_dim, TOKENS_PER_PROGRAM)
    factor, inverse = scales(amax)
    shape = (batch * heads * head_dim, tokens) if transposed else t.shape
    out = torch.empty(shape, dtype=dtype, device=t.device)
    _scale_kernel[grid](t, inverse, out, tokens, heads, head_dim, TOKENS_PER_PROGRAM, transposed)
    return out, factor
