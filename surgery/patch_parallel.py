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

import torch
import torch.distributed as dist

from clear_surgery.plugins.band_parallel import BandPlan, band_parallel_attention

from .errors import InvalidValueError
from .families.base import bound_arguments
from .state import require_clear_state
from .tiling import map_tensors


class BandRuntime:
    """Hooks that run a CLEAR model on one band of image rows; owned by the model's ClearRuntime."""

    def __init__(self, model, family, runtime, group, text_merge: str = "exact"):
        self.plan_spec, self.runtime, self.group, self.text_merge = family.tile_plan, runtime, group, text_merge
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.band = None  # (start token, stop token) of this rank's rows in the current call
        self.tokens = 0  # image tokens of the whole image in the current call
        # entry: after the tile layout's permutation (registered earlier); exit: before its inverse (prepend)
        self.handles = [model.register_forward_pre_hook(self._entry, with_kwargs=True),
                        model.register_forward_hook(self._exit, with_kwargs=True, prepend=True)]
        for names, hook, first in ((self.plan_spec.token_modules, self._cut, False),
                                   (self.plan_spec.exit_modules, self._gather, True)):
            for name in names:
                module = getattr(model, name, None)
                if isinstance(module, torch.nn.Module):
                    self.handles.append(module.register_forward_hook(hook, prepend=first))

    def plan(self, radius: float) -> BandPlan:
        height, width = self.runtime.current_grid()
        return BandPlan.split(height, width, radius, self.world, self.runtime.tile)

    def rows(self) -> BandPlan:
        """The split of the current call's rows (no radius: which rows each rank owns)."""
        height, width = self.runtime.current_grid()
        return BandPlan(height, width, self.world, 0, self.runtime.tile)

    def text_len(self, query) -> int:
        return query.shape[1] - (self.band[1] - self.band[0])

    def attend(self, query, key, value, text_first: bool, radius: float, backend: str, scale):
        return band_parallel_attention(query, key, value, text_len=self.text_len(query), text_first=text_first,
                                       plan=self.plan(radius), radius=radius, scale=scale, backend=backend,
                                       group=self.group, text_merge=self.text_merge)

    def _take(self, x):
        if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == self.tokens:
            return x[:, self.band[0]:self.band[1]]
        return x

    def _entry(self, model, args, kwargs):
        height, width = self.runtime.current_grid()  # of the whole image: the grid hook runs first
        rows = self.rows().rows(self.rank)
        if rows[1] <= rows[0]:
            unit = f" (split in whole tiles of {self.runtime.tile[0]} rows)" if self.runtime.tile else ""
            raise InvalidValueError(f"patch parallel: {self.world} ranks for an image of {height} token rows{unit} "
                                    f"leave rank {self.rank} without rows")
        self.band, self.tokens = (rows[0] * width, rows[1] * width), height * width
        bound = bound_arguments(model, args, kwargs)
        for name in [n for n in self.plan_spec.entry_tensors if n in bound]:
            bound[name] = self._take(bound.get(name))
        for name in self.plan_spec.entry_lists:
            if bound.get(name) is not None:
                bound[name] = [self._take(x) for x in bound[name]]
        ids = bound.get(self.plan_spec.ids) if self.plan_spec.ids else None
        if ids is not None:  # position ids (RoPE) of the band's tokens
            bound[self.plan_spec.ids] = ids.narrow(ids.ndim - 2, self.band[0], self.band[1] - self.band[0])
        return (), bound

    def _gather_tensor(self, x):
        """All ranks' bands of x (batch, band tokens, channels) back into the whole image, on every rank."""
        if not (isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == self.band[1] - self.band[0]):
            return x
        spec = self.rows()
        counts = [(stop - start) * spec.width for start, stop in map(spec.rows, range(self.world))]
        padded = torch.zeros(x.shape[0], max(counts), x.shape[2], dtype=x.dtype, device=x.device)
        padded[:, :x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, counts)], 1)

    def _exit(self, model, args, kwargs, output):
        return map_tensors(output, self._gather_tensor)

    def _cut(self, module, args, output):
        return self._take(output)

    def _gather(self, module, args, output):
        return self._gather_tensor(output)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def init_from_torchrun() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1; NCCL with one GPU per process, else
    gloo); True when this call started it."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def enable_patch_parallel(model: torch.nn.Module, group=None, *, text_merge: str = "exact") -> None:
    """Split every call of a CLEAR ``model`` over the ranks of ``group`` (default: the whole world) by
    rows of the image; call on every rank after ``apply_clear``, with the same inputs on every rank.
    Outputs equal the single-device model's, on every rank. ``text_merge="average"``: the paper's
    averaging of the text queries over ranks (approximate; for comparison)."""
    from clear_surgery.plugins.band_parallel import TEXT_MERGES

    if text_merge not in TEXT_MERGES:
        raise InvalidValueError(f"text_merge must be one of {TEXT_MERGES}, got {text_merge!r}")
    state = require_clear_state(model, "run patch parallel")
    if not dist.is_initialized():
        raise InvalidValueError("patch parallel needs torch.distributed initialized (launch with torchrun)")
    if state.family.tile_plan is None:
        raise InvalidValueError(f"{type(model).__name__} ({state.family.name} family) has no plan of where its image "
                                "tokens enter and leave: patch parallel is not available for it")
    if state.runtime.band is not None:
        raise InvalidValueError("patch parallel is enabled already")
    # dense attention over image tokens (SD3.5's image-only attn2, sites left dense) needs the whole image
    dense = [s.module for s in state.analysis.sites if s.kind in ("image", "joint") and s.module not in state.sites]
    if dense:
        raise InvalidValueError(f"patch parallel splits image tokens by rows, but {', '.join(dense[:4])} "
                                f"{'attend' if len(dense) > 1 else 'attends'} densely over all image tokens")
    state.runtime.band = BandRuntime(model, state.family, state.runtime, group, text_merge)
    state.runtime.hooks.append(state.runtime.band)


def disable_patch_parallel(model: torch.nn.Module) -> None:
    runtime = require_clear_state(model, "stop patch parallel").runtime
    if runtime.band is not None:
        runtime.band.remove()
        runtime.hooks.remove(runtime.band)
        runtime.band = None


__all__ = ["BandRuntime", "disable_patch_parallel", "enable_patch_parallel", "init_from_torchrun"]
