"""Exact merging of attention computed over disjoint parts of the keys.

Attention of one query over keys K = K1 ∪ K2 ∪ ... (disjoint) is the softmax-weighted mix of the
parts' outputs, each weighted by exp(lse_i - lse) with lse = logsumexp_i(lse_i): what a rank that
saw only some of the keys (patch parallelism) contributes, given its log-sum-exp.
"""

from __future__ import annotations

import torch


def merge_partials(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """outs: (..., head_dim) partial outputs; lses: (...) their log-sum-exp (natural log, -inf where a part
    saw no key). Returns the merged output (dtype of the first part) and the merged log-sum-exp (float32, or float64 for float64 parts).
    A row that no part saw stays 0."""
    work = torch.promote_types(outs[0].dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    stacked = torch.stack([lse.to(work) for lse in lses])
    lse = torch.logsumexp(stacked, 0)
    weights = torch.exp(stacked - lse.masked_fill(torch.isinf(lse), 0.0)).nan_to_num(0.0)
    out = sum(o.to(work) * w[..., None] for o, w in zip(outs, weights))
    return out.to(outs[0].dtype), lse
