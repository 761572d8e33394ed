"""Patch parallelism: one image's tokens split into row bands over the ranks of a process group.

Every op of an MMDiT other than attention works token by token, so each rank runs the whole model
on the text tokens and its own band of image rows; only CLEAR attention needs other ranks' tokens
(``clear_surgery.plugins.band_parallel``: halo rows of keys and values from each neighbour, text
queries merged exactly by log-sum-exp). Where image tokens enter and leave the model is the family's
``TilePlan`` (the same places the tile layout permutes): they are cut into bands on entry and the
bands gathered on exit, so the model's inputs and outputs are the single-device ones, on every rank.
Weights are replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from clear_surgery.plugins.band_parallel import BandPlan, band_parallel_attention

from .boundary import TokenBoundary, is_token_tensor
from .errors import InvalidValueError
from .processors import AttentionCall
from .state import require_clear_state


class BandRuntime(TokenBoundary):
    """Runs a CLEAR model on one band of image rows: cuts the band on entry, gathers all bands on exit, and
    hands every attention call to the band-parallel op (a step of the model's attention route)."""

    ROUTE = "patch-parallel"

    def __init__(self, model, family, runtime, group, text_merge: str = "exact"):
        # entry: after the tile layout's permutation (registered earlier); exit: before its inverse
        super().__init__(model, family.tile_plan, outermost=True)
        self.runtime, self.group, self.text_merge = runtime, group, text_merge
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.band = None  # (start token, stop token) of this rank's rows in the current call
        self.tokens = 0  # image tokens of the whole image in the current call
        # first on the route: the steps after it (proportional attention) see the whole image's token count
        runtime.add_route(self.ROUTE, self.route, first=True)

    def plan(self, radius: float) -> BandPlan:
        height, width = self.runtime.current_grid()
        return BandPlan.split(height, width, radius, self.world, self.runtime.tile)

    def rows(self) -> BandPlan:
        """The split of the current call's rows (no radius: which rows each rank owns)."""
        height, width = self.runtime.current_grid()
        return BandPlan(height, width, self.world, 0, self.runtime.tile)

    def route(self, call: AttentionCall, proceed):
        if call.pool_weight is not None or call.attn_mask is not None or call.images:
            raise ValueError("patch parallelism runs plain CLEAR only: not the 'down' variant (its pooled keys need "
                             "the whole image on every rank), text padding masks or several images")
        # this rank holds the text and one band of image rows
        text_len = call.query.shape[1] - (self.band[1] - self.band[0])
        return proceed(replace(call, text_len=text_len, op=self.attend))

    def attend(self, call: AttentionCall):
        return band_parallel_attention(call.query, call.key, call.value, text_len=call.text_len,
                                       text_first=call.text_first, plan=self.plan(call.radius), radius=call.radius,
                                       scale=call.scale, backend=call.backend, group=self.group,
                                       text_merge=self.text_merge)

    def start(self, model):
        height, width = self.runtime.current_grid()  # of the whole image: the grid hook runs first
        rows = self.rows().rows(self.rank)
        if rows[1] <= rows[0]:
            unit = f" (split in whole tiles of {self.runtime.tile[0]} rows)" if self.runtime.tile else ""
            raise InvalidValueError(f"patch parallel: {self.world} ranks for an image of {height} token rows{unit} "
                                    f"leave rank {self.rank} without rows")
        self.band, self.tokens = (rows[0] * width, rows[1] * width), height * width

    def enter(self, x):
        return x[:, self.band[0]:self.band[1]] if is_token_tensor(x, self.tokens) else x

    def enter_ids(self, ids):  # position ids (RoPE) of the band's tokens
        return ids.narrow(ids.ndim - 2, self.band[0], self.band[1] - self.band[0])

    def leave(self, x):
        """All ranks' bands of x (batch, band tokens, channels) back into the whole image, on every rank."""
        if not is_token_tensor(x, self.band[1] - self.band[0]):
            return x
        spec = self.rows()
        counts = [(stop - start) * spec.width for start, stop in map(spec.rows, range(self.world))]
        padded = torch.zeros(x.shape[0], max(counts), x.shape[2], dtype=x.dtype, device=x.device)
        padded[:, :x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, counts)], 1)

    def remove(self):
        super().remove()
        self.runtime.remove_route(self.ROUTE)


def enable_patch_parallel(model: torch.nn.Module, group=None, *, text_merge: str = "exact") -> None:
    """Split every call of a CLEAR ``model`` over the ranks of ``group`` (default: the whole world) by
    rows of the image; call on every rank after ``apply_clear``, with the same inputs on every rank.
    Outputs equal the single-device model's, on every rank. ``text_merge="average"``: the paper's
    averaging of the text queries over ranks (approximate; for comparison)."""
    from clear_surgery.plugins.band_parallel import TEXT_MERGES

    if text_merge not in TEXT_MERGES:
        raise InvalidValueError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    state = require_clear_state(model, "run patch parallel")
    if state.config.image_attention != "dense":
        raise InvalidValueError("patch parallel with image_attention='local' (image-only CLEAR sites) is not built yet")
    if not dist.is_initialized():
        raise InvalidValueError("patch parallel needs torch.distributed initialized (launch with torchrun)")
    if state.family.tile_plan is None:
        raise InvalidValueError(f"{type(model).__name__} ({state.family.name} family) has no plan of where its image "
                                "tokens enter and leave: patch parallel is not available for it")
    if patch_parallel_of(state.runtime) is not None:
        raise InvalidValueError("patch parallel is enabled already")
    # dense attention over image tokens (SD3.5's image-only attn2, sites left dense) needs the whole image
    dense = [s.module for s in state.analysis.sites if s.kind in ("image", "joint") and s.module not in state.sites]
    if dense:
        raise InvalidValueError(f"patch parallel splits image tokens by rows, but {', '.join(dense[:4])} "
                                f"{'attend' if len(dense) > 1 else 'attends'} densely over all image tokens")
    state.runtime.hooks.append(BandRuntime(model, state.family, state.runtime, group, text_merge))


def disable_patch_parallel(model: torch.nn.Module) -> None:
    runtime = require_clear_state(model, "stop patch parallel").runtime
    band = patch_parallel_of(runtime)
    if band is not None:
        band.remove()
        runtime.hooks.remove(band)


def patch_parallel_of(runtime) -> BandRuntime | None:
    return next((hook for hook in runtime.hooks if isinstance(hook, BandRuntime)), None)


__all__ = ["BandRuntime", "disable_patch_parallel", "enable_patch_parallel"]
