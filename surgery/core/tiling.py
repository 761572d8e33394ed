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

from clear_surgery.plugins.layout import tile_inverse_permutation, tile_permutation

from .boundary import TokenBoundary, is_token_tensor


@torch.compiler.disable  # built once per grid and cached; traced, inductor mis-bounds the indices
@functools.lru_cache(maxsize=32)
def permutations(height: int, width: int, tile: tuple[int, int], device: torch.device):
    return tile_permutation(height, width, tile, device), tile_inverse_permutation(height, width, tile, device)


def traced_permutations(height, width, tile: tuple[int, int], device: torch.device):
    """The same, computed in the graph: for torch.export with symbolic image sizes."""
    return tile_permutation(height, width, tile, device), tile_inverse_permutation(height, width, tile, device)


class TileLayout(TokenBoundary):
    """Runs a model in tile order; owned by the model's ClearRuntime."""

    def __init__(self, model, family, runtime, tile: tuple[int, int]):
        super().__init__(model, family.tile_plan)
        self.runtime, self.tile = runtime, tuple(tile)
        self.perm = self.inverse = None
        self.tokens = 0

    def start(self, model):
        height, width = self.runtime.current_grid()  # set by the grid hook, which runs first
        if self.runtime.images:
            raise ValueError("the tile token layout takes one image: a call with several images (a reference image) "
                             "needs token_layout='raster'")
        symbolic = isinstance(height, torch.SymInt) or isinstance(width, torch.SymInt)
        build = traced_permutations if symbolic else permutations
        self.perm, self.inverse = build(height, width, self.tile, next(model.parameters()).device)
        self.tokens = self.perm.numel()

    def enter(self, x):
        return x.index_select(1, self.perm) if is_token_tensor(x, self.tokens) else x

    def enter_ids(self, ids):
        return ids.index_select(ids.ndim - 2, self.perm)

    def leave(self, x):
        return x.index_select(1, self.inverse) if is_token_tensor(x, self.tokens) else x
