"""Tile token layout: permute image tokens into 2-D tiles once at the model input and back once
at the output, so every CLEAR layer runs on tile order (compact key blocks) with no per-layer
permutation. Every op of an MMDiT other than attention is per token, so nothing else changes.

Where tokens enter and leave is the family's ``TilePlan`` (FLUX: hidden_states, controlnet_cond,
img_ids and ControlNet residuals on entry; SD3: the patch embedders' outputs and the ControlNet
residuals on entry, proj_out's output on exit). On exit every (batch, image tokens, channels)
tensor the model returns is permuted back.
"""

from __future__ import annotations

import functools

import torch
from diffusers.utils import BaseOutput

from clear_surgery.plugins.layout import tile_inverse_permutation, tile_permutation

from .families.base import bound_arguments


@torch.compiler.disable  # built once per grid and cached; traced, inductor mis-bounds the indices
@functools.lru_cache(maxsize=32)
def permutations(height: int, width: int, tile: tuple[int, int], device: torch.device):
    return tile_permutation(height, width, tile, device), tile_inverse_permutation(height, width, tile, device)


def traced_permutations(height, width, tile: tuple[int, int], device: torch.device):
    """The same, computed in the graph: for torch.export with symbolic image sizes."""
    return tile_permutation(height, width, tile, device), tile_inverse_permutation(height, width, tile, device)


def _take(x, index, tokens):
    if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == tokens:
        return x.index_select(1, index)
    return x


def map_tensors(obj, fn):
    """fn applied to every leaf of a model output (a diffusers BaseOutput, lists and tuples of tensors)."""
    if isinstance(obj, BaseOutput):
        for key in list(obj.keys()):
            obj[key] = map_tensors(obj[key], fn)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    return fn(obj)


def map_image_tensors(obj, index: torch.Tensor, tokens: int):
    """Apply the permutation to every (batch, tokens, channels) tensor inside obj."""
    return map_tensors(obj, lambda x: _take(x, index, tokens))


class TileLayout:
    """Hooks that run a model in tile order; owned by the model's ClearRuntime."""

    def __init__(self, model, family, runtime, tile: tuple[int, int]):
        self.plan, self.runtime, self.tile, self.handles = family.tile_plan, runtime, tuple(tile), []
        self.perm = self.inverse = None
        self.handles.append(model.register_forward_pre_hook(self._entry, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._exit, with_kwargs=True))
        for names, hook in ((self.plan.token_modules, self._to_tiles), (self.plan.exit_modules, self._to_raster)):
            for name in names:
                module = getattr(model, name, None)
                if isinstance(module, torch.nn.Module):
                    self.handles.append(module.register_forward_hook(hook))

    def _tokens(self) -> int:
        return self.perm.numel()

    def _entry(self, model, args, kwargs):
        height, width = self.runtime.current_grid()  # set by the grid hook, which runs first
        if self.runtime.images:
            raise ValueError("the tile token layout takes one image: a call with several images (a reference image) "
                             "needs token_layout='raster'")
        symbolic = isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt)
        build = traced_permutations if symbolic else permutations
        self.perm, self.inverse = build(height, width, self.tile, self._device(model))
        bound = bound_arguments(model, args, kwargs)
        tokens = self._tokens()
        for name in [n for n in self.plan.entry_tensors if n in bound]:
            bound[name] = _take(bound.get(name), self.perm, tokens)
        for name in self.plan.entry_lists:
            if bound.get(name) is not None:
                bound[name] = [_take(x, self.perm, tokens) for x in bound[name]]
        ids = bound.get(self.plan.ids) if self.plan.ids else None
        if ids is not None:
            bound[self.plan.ids] = ids.index_select(ids.ndim - 2, self.perm)
        return (), bound

    def _exit(self, model, args, kwargs, output):
        return map_image_tensors(output, self.inverse, self._tokens())

    def _to_tiles(self, module, args, output):
        return _take(output, self.perm, self._tokens())

    def _to_raster(self, module, args, output):
        return _take(output, self.inverse, self._tokens())

    @staticmethod
    def _device(model):
        return next(model.parameters()).device

    def remove(self):
        for handle in self.handles:
            handle.remove()
