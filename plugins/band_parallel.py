"""CLEAR attention of one image split into row bands over the ranks of a process group (patch
parallelism), exact.

Each rank holds every text token and one band of image rows (raster order). An image query at row y
sees image keys in rows y - h .. y + h only, h = ceil(r) - 1 (d² < r² needs |dy| <= h), so a rank needs
just h rows of keys and values from each neighbouring band (the halo), not the whole image:

- image queries: the band with its halos is a small CLEAR problem of its own (text + halo + band +
  halo rows); the band's queries see exactly the keys they see in the whole image, so their output is
  exact. The triton kernel runs the band's own query blocks only; other backends compute the halo
  rows' queries too, and they are dropped.
- tile token layout (tiles of th rows): bands and halos are whole tile rows, so a band, its halos and
  the local problem are each contiguous in tile order and tiled exactly as in the whole image.
- text queries see every key: each rank attends them to its own band's image keys (rank 0 also to
  the text keys), with the log-sum-exp, while the halo rows travel; the partial results are merged
  across ranks exactly (max, then sums of exp-weighted outputs; not an average, which is what the
  paper's Eq. 7 does: ``text_merge="average"``, for comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import QUERY_RANGE, choose_backend
from .layout import TokenLayout


class BandPlanError(ValueError):
    pass


@dataclass(frozen=True)
class BandPlan:
    """Which image rows each rank owns (balanced, top to bottom) and the halo every band needs."""

    height: int
    width: int
    world: int
    halo: int  # rows of keys a band needs from each neighbour (whole tile rows with a tile layout)
    tile: tuple[int, int] | None = None  # the tile token layout's (th, tw); None: raster

    @classmethod
    def split(cls, height: int, width: int, radius: float, world: int,
              tile: tuple[int, int] | None = None) -> "BandPlan":
        unit = tile[0] if tile else 1
        halo = -(-max(math.ceil(radius) - 1, 0) // unit) * unit
        plan = cls(height, width, world, halo, tuple(tile) if tile else None)
        thinnest = min(stop - start for start, stop in map(plan.rows, range(world)))
        if thinnest < 1 or (world > 1 and thinnest < halo):
            raise BandPlanError(f"{world} ranks split {height} image rows into bands of {thinnest} rows, thinner than "
                                f"the {halo} rows of keys a query sees above and below at r={radius:g}: use at most "
                                f"{max(1, height // max(halo, 1))} ranks or a smaller radius")
        return plan

    def rows(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the image rows ``rank`` owns (balanced in whole tile rows)."""
        unit = self.tile[0] if self.tile else 1
        units = -(-self.height // unit)
        base, extra = divmod(units, self.world)
        start = rank * base + min(rank, extra)
        stop = start + base + (1 if rank < extra else 0)
        return min(start * unit, self.height), min(stop * unit, self.height)

    def tokens(self, rank: int) -> slice:
        """The raster image-token indices of ``rank``'s band."""
        start, stop = self.rows(rank)
        return slice(start * self.width, stop * self.width)


def _local_sequence(q, k, v, txt, img, plan: BandPlan, rank: int, group, text_first: bool):
    """q, k, v of the band's own CLEAR problem: text, then (or before) the halo rows above, the band, the
    halo rows below, in one buffer each; the halo rows of k and v are received from the neighbours
    straight into their places, the halo rows of q are zeros (their outputs are not used). The
    exchange is only started: the returned ``wait()`` completes it (compute may run in between)."""
    count, rows = img.stop - img.start, plan.halo * plan.width
    above = rows if rank > 0 else 0
    below = rows if rank < plan.world - 1 else 0
    text_len = txt.stop - txt.start
    local = above + count + below
    base = text_len if text_first else 0  # first image token of the local sequence
    text_at = slice(0, text_len) if text_first else slice(local, local + text_len)
    buffers = []
    for t in (q, k, v):
        buffer = t.new_empty(t.shape[0], text_len + local, *t.shape[2:])
        buffer[:, text_at] = t[:, txt]
        buffer[:, base + above:base + above + count] = t[:, img]
        buffers.append(buffer)
    lq, lk, lv = buffers
    lq[:, base:base + above].zero_()
    lq[:, base + above + count:base + local].zero_()
    ops, staged = [], []
    for neighbour, mine, theirs in ((rank - 1, slice(0, rows), slice(base, base + above)),
                                    (rank + 1, slice(count - rows, count), slice(base + above + count, base + local))):
        if not 0 <= neighbour < plan.world or not rows:
            continue
        for t, buffer in ((k, lk), (v, lv)):
            send = t[:, img][:, mine].contiguous()
            target = buffer[:, theirs]
            receive = target if target.is_contiguous() else torch.empty_like(target)
            ops += [dist.P2POp(dist.isend, send, neighbour, group), dist.P2POp(dist.irecv, receive, neighbour, group)]
            staged.append((target, receive))
    requests = dist.batch_isend_irecv(ops) if ops else []

    def wait():
        for request in requests:
            request.wait()
        for target, receive in staged:
            if receive is not target:
                target.copy_(receive)

    return lq, lk, lv, above, local // plan.width, wait  # above: halo tokens before the band


def _merge_across_ranks(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Exact attention over all ranks' keys from each rank's partial output and log-sum-exp."""
    top = lse.clone(memory_format=torch.contiguous_format)  # collectives take contiguous tensors
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top.masked_fill(torch.isinf(top), 0.0)).nan_to_num(0.0)
    total = torch.cat([out.float() * weight[..., None], weight[..., None]], -1)
    dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return (total[..., :-1] / total[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)).to(out.dtype)


TEXT_MERGES = ("exact", "average")


def band_parallel_attention(q, k, v, *, text_len: int, text_first: bool, plan: BandPlan, radius: float,
                            scale: float | None = None, backend: str = "auto", group=None,
                            text_merge: str = "exact") -> torch.Tensor:
    """CLEAR attention of this rank's part of the sequence: q, k, v (batch, text_len + band tokens, heads,
    head_dim) hold the text tokens and this rank's band of image rows (text first or last, raster order).
    Returns this rank's part of the output, equal to the same rows of single-device CLEAR attention.
    ``text_merge="average"``: the text queries' outputs are the mean of each rank's attention over the
    text and its own band (the paper's Eq. 7; approximate), instead of the exact log-sum-exp merge."""
    if text_merge not in TEXT_MERGES:
        raise BandPlanError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    rank = dist.get_rank(group)
    if dist.get_world_size(group) != plan.world:
        raise BandPlanError(f"the plan is for {plan.world} ranks, the group has {dist.get_world_size(group)}")
    band = plan.tokens(rank)
    count = band.stop - band.start
    if q.shape[1] != text_len + count:
        raise BandPlanError(f"rank {rank} holds {q.shape[1]} tokens; its band and the text are {text_len + count}")
    img = slice(text_len, text_len + count) if text_first else slice(0, count)
    txt = slice(0, text_len) if text_first else slice(count, count + text_len)
    lq, lk, lv, above, local_rows, halos_received = _local_sequence(q, k, v, txt, img, plan, rank, group,
                                                                    text_first)
    # text queries: every key, split over the ranks (rank 0 adds the text keys); computed while the halo
    # rows travel, merged (a collective) after the image queries
    if text_merge == "average":  # every rank: text + its band; the mean over ranks
        out_txt, lse = _dense_with_lse(q[:, txt], k, v, scale)
    else:
        keys = slice(None) if rank == 0 else img
        out_txt, lse = _dense_with_lse(q[:, txt], k[:, keys], v[:, keys], scale)
    halos_received()
    # image queries: the band among its halos as a CLEAR problem of its own; with the triton kernel only
    # the band's own query blocks run
    layout = TokenLayout(text_len, text_first, local_rows, plan.width, plan.tile)
    chosen = _band_backend(backend, lq, lk, lv, layout, float(radius), scale)
    band = (above, above + count)  # the band's image tokens in the local problem
    extra = {"image_queries": band} if QUERY_RANGE in chosen.features else {}
    full = chosen.forward(lq, lk, lv, layout, float(radius), scale, **extra)
    start = layout.image_start + band[0]
    out_img = full[:, start:start + count]
    if text_merge == "average":
        total = out_txt.float().contiguous()
        dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
        out_txt = (total / plan.world).to(q.dtype)
    else:
        out_txt = _merge_across_ranks(out_txt, lse, group)
    return torch.cat([out_txt, out_img], 1) if text_first else torch.cat([out_img, out_txt], 1)


def _band_backend(backend, q, k, v, layout, radius, scale):
    """'auto' prefers a backend that computes the band's queries alone (the halo rows' queries are wasted
    work), and takes any other otherwise; a named backend runs as asked."""
    if backend == "auto":
        try:
            return choose_backend(backend, q, k, v, layout, radius, scale, needs={QUERY_RANGE})
        except ValueError:
            pass
    return choose_backend(backend, q, k, v, layout, radius, scale)


def _dense_with_lse(q, k, v, scale):
    """Plain attention with the log-sum-exp of each row (B, N, H, D layout): FlexAttention's fused kernel
    on a GPU, else one head at a time in fp32."""
    if q.device.type == "cuda":
        from .flex import _compiled_flex

        out, lse = _compiled_flex()(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale, return_lse=True)
        return out.transpose(1, 2), lse.float().transpose(1, 2)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    outs, lses = [], []
    for h in range(q.shape[2]):
        scores = torch.einsum("bnd,bmd->bnm", q[:, :, h].float(), k[:, :, h].float()) * scale
        lse = scores.logsumexp(-1)
        outs.append(torch.einsum("bnm,bmd->bnd", torch.exp(scores - lse[..., None]), v[:, :, h].float()))
        lses.append(lse)
    return torch.stack(outs, 2).to(q.dtype), torch.stack(lses, -1)
