"""Chunked backend: CLEAR attention on any device in memory linear in the tokens, with plain PyTorch ops.

Text queries see every key: one dense pass over all keys (text x N scores). Image queries go in chunks of
consecutive tokens; a chunk's image rows span a few grid rows (raster order) or a few tile bands (tile
order), and its queries can only see image keys within ceil(r) - 1 rows above and below that span. So each
chunk attends to the text keys, the extra (pooled) keys and the image keys of those rows (gathered by index),
with the exact mask of that small problem. Memory is chunk x (text + window rows) scores, never N x N: what
the dense reference (an N x N mask) and FlexAttention's unfused CPU path (N x N scores) cannot offer. Same
signature and result as ``reference_attention``, differentiable (autograd through the chunks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import TokenLayout
from .masking import key_bias
from .reference import with_extra

# scores held at once per chunk (batch x heads x queries x keys, float32): 64 M elements = 256 MB
CHUNK_SCORES = 1 << 26


def chunked_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    if not q.dtype.is_floating_point:
        return f"dtype {q.dtype}"
    return None


def _attend(q, k, v, scale, allowed, bias=None, lse: bool = False):
    """Softmax attention of q (B, n, H, D) over k, v (B, m, H, D) where ``allowed`` (n, m or B, n, m) is True,
    ``bias`` (B, n or 1, m) added to the scores. Returns the output and, with ``lse``, the log-sum-exp (B, n, H)
    in float32 (float64 for float64 inputs), else None. Every row sees at least one key (its own image token,
    or the image keys of a text query)."""
    mask = (allowed if allowed.dim() == 3 else allowed[None])[:, None]
    if not lse:  # PyTorch's fused attention with the chunk's mask: 3-5x the einsum path below on a CPU
        if bias is not None:
            mask = torch.where(mask, bias[:, None].to(q.dtype), float("-inf"))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2), None
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(work), k.to(work)) * scale
    scores = scores.masked_fill(~mask, float("-inf")) + (bias[:, None].to(work) if bias is not None else 0)
    log_sum = torch.logsumexp(scores, -1)
    out = torch.einsum("bhnm,bmhd->bnhd", torch.exp(scores - log_sum[..., None]), v.to(work))
    return out.to(q.dtype), log_sum.transpose(1, 2)


def chunked_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *, extra=None,
                      text_bias=None, return_lse: bool = False):
    """Same signature and result as reference_attention, in memory linear in the tokens."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    k, v = with_extra(k, v, extra)
    batch, tokens, heads = q.shape[:3]
    device = q.device
    is_image, y, x = layout.positions(device)
    keys = k.shape[1]
    is_extra = torch.arange(keys, device=device) >= layout.seq_len
    key_image = torch.cat([is_image, torch.zeros(keys - tokens, dtype=torch.bool, device=device)])
    y, x = y.to(torch.int32), x.to(torch.int32)  # the n x m distance buffers below: half of int64's
    key_y = torch.cat([y, torch.full((keys - tokens,), -1, dtype=torch.int32, device=device)])
    key_x = torch.cat([x, torch.full((keys - tokens,), -1, dtype=torch.int32, device=device)])
    bias = key_bias(text_bias, layout)[:, None] if text_bias is not None else None  # (B, 1, keys)
    results = _Results(q, v, return_lse, autograd=torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, text_bias)))

    text = torch.nonzero(~is_image)[:, 0]
    if len(text):  # text queries: every key but the extra ones
        results.add(text, *_attend(q[:, text], k, v, scale, ~is_extra[None, :].expand(len(text), -1), bias,
                                   return_lse))
    image = torch.nonzero(is_image)[:, 0]
    reach = max(math.ceil(radius) - 1, 0)  # |dy| a visible key can be away: dy² < r²
    text_keys = torch.nonzero(~key_image)[:, 0]  # text and extra keys: every image query may see them
    chunk = _chunk_size(batch * heads, len(text_keys), max(w for _, w in layout.grids), reach)
    r2 = radius * radius
    for start in range(0, len(image), chunk):
        rows = image[start:start + chunk]
        qy, qx = y[rows], x[rows]
        near = key_image & (key_y >= qy.min() - reach) & (key_y <= qy.max() + reach)
        picked = torch.cat([text_keys, torch.nonzero(near)[:, 0]])
        dy = qy[:, None] - key_y[picked][None, :]
        dx = qx[:, None] - key_x[picked][None, :]
        visible = (dy.mul_(dy).add_(dx.mul_(dx)) < r2).logical_or_(~key_image[picked][None, :])
        picked_bias = bias[..., picked] if bias is not None else None
        results.add(rows, *_attend(q[:, rows], k[:, picked], v[:, picked], scale, visible, picked_bias, return_lse))
    out, lse = results.gathered()
    return (out, lse) if return_lse else out


class _Results:
    """The chunks' outputs and log-sum-exps in sequence order: written into one buffer (without autograd:
    nothing small stays allocated between the chunks' large transient scores, which otherwise fragments the
    C heap: 2.1 GB against 0.12 GB peak at 65 k tokens), or concatenated differentiably."""

    def __init__(self, q, v, lse: bool, autograd: bool):
        self.autograd, self.parts = autograd, []
        if not autograd:
            self.out = q.new_empty(*q.shape[:3], v.shape[-1])
            self.lse = torch.empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32),
                                   device=q.device) if lse else None

    def add(self, rows, out, lse):
        if self.autograd:
            self.parts.append((rows, out, lse))
            return
        self.out[:, rows] = out
        if lse is not None:
            self.lse[:, rows] = lse

    def gathered(self):
        if not self.autograd:
            return self.out, self.lse
        order = torch.cat([rows for rows, _, _ in self.parts])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        out = torch.cat([o for _, o, _ in self.parts], 1)[:, inverse]
        lse = torch.cat([l for _, _, l in self.parts], 1)[:, inverse] if self.parts[0][2] is not None else None
        return out, lse


def _chunk_size(batch_heads: int, global_keys: int, width: int, reach: int) -> int:
    """Image queries per chunk: reach + 1 grid rows (a chunk then sees about three times its own rows: fewer
    wasted scores than longer chunks, fewer steps than shorter ones; 2-4 rows measured fastest at r = 4 on a
    CPU), fewer if its scores (queries x keys, float32) would pass CHUNK_SCORES; at least one row."""
    rows = max(reach + 1, 2)
    while rows > 1 and batch_heads * rows * width * (global_keys + (rows + 2 * reach + 2) * width) > CHUNK_SCORES:
        rows -= 1
    return rows * width
