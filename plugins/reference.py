"""Reference backend: the exact dense mask + PyTorch SDPA. The truth every backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import TokenLayout, dense_mask
from .masking import key_bias

# A dense (N, N) boolean mask beyond this many tokens costs more memory than a test should.
MAX_REFERENCE_TOKENS = 16384


def reference_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    if q.shape[1] > MAX_REFERENCE_TOKENS:
        return f"builds an N×N mask; {q.shape[1]} tokens is more than {MAX_REFERENCE_TOKENS}"
    return None


def with_extra(k, v, extra):
    """Keys and values with the extra segment appended (what the dense and flex backends attend to)."""
    if extra is None:
        return k, v
    return torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1)


def reference_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                        extra=None, text_bias=None, return_lse: bool = False):
    """q, k, v: (batch, tokens, heads, head_dim); ``extra``: (keys, values) of ``layout.extra_keys``
    tokens that image queries see in whole; ``text_bias``: (batch, text_len) float32 added to the scores of
    the text keys for every query (-inf: a padded key, hidden). Returns (batch, tokens, heads, head_dim_v); with
    ``return_lse`` also the log-sum-exp (natural log) of each query row's scaled, masked scores,
    (batch, tokens, heads) float32 (float64 for float64 inputs): what merging partial results exactly needs."""
    k, v = with_extra(k, v, extra)
    mask = dense_mask(layout, radius, q.device)
    if text_bias is not None:  # per sample, additive: (batch, 1, queries, keys)
        bias = key_bias(text_bias, layout).to(torch.promote_types(q.dtype, torch.float32))
        mask = torch.where(mask[None], bias[:, None, :], float("-inf"))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask if text_bias is None else mask.to(q.dtype),
                                         scale=scale).transpose(1, 2)
    if not return_lse:
        return out
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    work = torch.promote_types(q.dtype, torch.float32)
    mask = mask.reshape(-1, *mask.shape[-2:])  # (1 or batch, queries, keys): bool, or additive with the bias

    def masked(scores):
        return scores + mask.to(work) if text_bias is not None else scores.masked_fill(~mask, float("-inf"))

    lse = [masked(torch.einsum("bnd,bmd->bnm", q[:, :, h].to(work), k[:, :, h].to(work)) * scale).logsumexp(-1)
           for h in range(q.shape[2])]  # one head at a time: memory
    return out, torch.stack(lse, -1)
