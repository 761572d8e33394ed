"""Reference backend: the exact dense mask + PyTorch SDPA. The truth every backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import TokenLayout, dense_mask, validate_call

# A dense (N, N) boolean mask beyond this many tokens costs more memory than a test should.
MAX_REFERENCE_TOKENS = 16384


def can_run_reference(q, k, v, layout: TokenLayout, radius: float, scale=None, raise_error: bool = False) -> bool:
    validate_call(q, k, v, layout, radius)
    if q.shape[1] > MAX_REFERENCE_TOKENS:
        if raise_error:
            raise ValueError(f"reference backend builds an N×N mask; {q.shape[1]} tokens is more than "
                             f"{MAX_REFERENCE_TOKENS}")
        return False
    return True


def reference_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                        return_lse: bool = False):
    """q, k, v: (batch, tokens, heads, head_dim). Returns (batch, tokens, heads, head_dim_v); with
    ``return_lse`` also the log-sum-exp (natural log) of each query row's scaled, masked scores,
    (batch, tokens, heads) float32 (float64 for float64 inputs): what merging partial results exactly needs."""
    mask = dense_mask(layout, radius, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale).transpose(1, 2)
    if not return_lse:
        return out
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    lse = [(torch.einsum("bnd,bmd->bnm", q[:, :, h].to(work), k[:, :, h].to(work)) * scale)
           .masked_fill(~mask, float("-inf")).logsumexp(-1) for h in range(q.shape[2])]  # one head at a time: memory
    return out, torch.stack(lse, -1)
