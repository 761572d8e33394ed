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


def reference_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None) -> torch.Tensor:
    """q, k, v: (batch, tokens, heads, head_dim). Returns (batch, tokens, heads, head_dim_v)."""
    mask = dense_mask(layout, radius, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
