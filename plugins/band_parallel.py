"""CLEAR attention of one image split into row bands over the ranks of a process group (patch
parallelism), exact.

Each rank holds every text token and one band of image rows (raster order). An image query at row y
sees image keys in rows y - h .. y + h only, h = ceil(r) - 1 (d² < r² needs |dy| <= h), so a rank needs
just h rows of keys and values from each neighbouring band (the halo), not the whole image:

- image queries: the band with its halos is a small CLEAR problem of its own (text + halo + band +
  halo rows); the band's queries see exactly the keys they see in the whole image, so their output is
  exact. (The halo rows' queries are computed too and dropped: 2h rows of extra work per band.)
- text queries see every key: each rank attends them to its own band's image keys (rank 0 also to
  the text keys), with the log-sum-exp, and the partial results are merged across ranks exactly
  (max, then sums of exp-weighted outputs; not an average, which is what the paper's Eq. 7 does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .op import attention


class BandPlanError(ValueError):
    pass


@dataclass(frozen=True)
class BandPlan:
    """Which image rows each rank owns (balanced, top to bottom) and the halo every band needs."""

    height: int
    width: int
    world: int
    halo: int  # rows of keys a band needs from each neighbour

    @classmethod
    def split(cls, height: int, width: int, radius: float, world: int) -> "BandPlan":
        halo = max(math.ceil(radius) - 1, 0)
        plan = cls(height, width, world, halo)
        thinnest = min(stop - start for start, stop in map(plan.rows, range(world)))
        if thinnest < 1 or (world > 1 and thinnest < halo):
            raise BandPlanError(f"{world} ranks split {height} image rows into bands of {thinnest} rows, thinner than "
                                f"the {halo} rows of keys a query sees above and below at r={radius:g}: use at most "
                                f"{max(1, height // max(halo, 1))} ranks or a smaller radius")
        return plan

    def rows(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the image rows ``rank`` owns."""
        base, extra = divmod(self.height, self.world)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def tokens(self, rank: int) -> slice:
        """The raster image-token indices of ``rank``'s band."""
        start, stop = self.rows(rank)
        return slice(start * self.width, stop * self.width)


def _exchange_halos(k: torch.Tensor, v: torch.Tensor, plan: BandPlan, rank: int, group) -> tuple[torch.Tensor, ...]:
    """K and V of the band with ``plan.halo`` rows from the band above and below (fewer at the image border)."""
    rows = plan.halo * plan.width
    kv = torch.cat([k, v], -1)  # one message per neighbour
    above, below = None, None
    ops = []
    if rank > 0 and rows:
        above = torch.empty_like(kv[:, :rows])
        ops += [dist.P2POp(dist.isend, kv[:, :rows].contiguous(), rank - 1, group),
                dist.P2POp(dist.irecv, above, rank - 1, group)]
    if rank < plan.world - 1 and rows:
        below = torch.empty_like(kv[:, -rows:])
        ops += [dist.P2POp(dist.isend, kv[:, -rows:].contiguous(), rank + 1, group),
                dist.P2POp(dist.irecv, below, rank + 1, group)]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    parts = [p for p in (above, kv, below) if p is not None]
    full = torch.cat(parts, 1)
    d = k.shape[-1]
    return full[..., :d], full[..., d:], (0 if above is None else plan.halo)


def _merge_across_ranks(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Exact attention over all ranks' keys from each rank's partial output and log-sum-exp."""
    top = lse.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top.masked_fill(torch.isinf(top), 0.0)).nan_to_num(0.0)
    total = torch.cat([out.float() * weight[..., None], weight[..., None]], -1)
    dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return (total[..., :-1] / total[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)).to(out.dtype)


def band_parallel_attention(q, k, v, *, text_len: int, text_first: bool, plan: BandPlan, radius: float,
                            scale: float | None = None, backend: str = "auto", group=None) -> torch.Tensor:
    """CLEAR attention of this rank's part of the sequence: q, k, v (batch, text_len + band tokens, heads,
    head_dim) hold the text tokens and this rank's band of image rows (text first or last, raster order).
    Returns this rank's part of the output, equal to the same rows of single-device CLEAR attention."""
    rank = dist.get_rank(group)
    if dist.get_world_size(group) != plan.world:
        raise BandPlanError(f"the plan is for {plan.world} ranks, the group has {dist.get_world_size(group)}")
    band = plan.tokens(rank)
    count = band.stop - band.start
    if q.shape[1] != text_len + count:
        raise BandPlanError(f"rank {rank} holds {q.shape[1]} tokens; its band and the text are {text_len + count}")
    img = slice(text_len, None) if text_first else slice(0, count)
    txt = slice(0, text_len) if text_first else slice(count, None)
    k_img, v_img, above = _exchange_halos(k[:, img], v[:, img], plan, rank, group)
    local_rows = k_img.shape[1] // plan.width
    # image queries: the band with its halos as a CLEAR problem of its own; halo queries are zeros, dropped
    q_img = torch.zeros_like(k_img[..., :q.shape[-1]])
    q_img[:, above * plan.width:above * plan.width + count] = q[:, img]
    seq = (lambda t, i: torch.cat([t[:, txt], i], 1)) if text_first else (lambda t, i: torch.cat([i, t[:, txt]], 1))
    full = attention(seq(q, q_img), seq(k, k_img), seq(v, v_img), text_len=text_len, text_first=text_first,
                     height=local_rows, width=plan.width, radius=radius, scale=scale, backend=backend)
    start = (text_len if text_first else 0) + above * plan.width
    out_img = full[:, start:start + count]
    # text queries: every key, split over the ranks (rank 0 adds the text keys), merged exactly
    keys = slice(None) if rank == 0 else img
    out_txt, lse = _dense_with_lse(q[:, txt], k[:, keys], v[:, keys], scale)
    out_txt = _merge_across_ranks(out_txt, lse, group)
    return torch.cat([out_txt, out_img], 1) if text_first else torch.cat([out_img, out_txt], 1)


def _dense_with_lse(q, k, v, scale):
    """Plain attention with the log-sum-exp of each row (B, N, H, D layout), one head at a time."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    outs, lses = [], []
    for h in range(q.shape[2]):
        scores = torch.einsum("bnd,bmd->bnm", q[:, :, h].float(), k[:, :, h].float()) * scale
        lse = scores.logsumexp(-1)
        outs.append(torch.einsum("bnm,bmd->bnd", torch.exp(scores - lse[..., None]), v[:, :, h].float()))
        lses.append(lse)
    return torch.stack(outs, 2).to(q.dtype), torch.stack(lses, -1)
