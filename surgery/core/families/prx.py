"""PRX: image queries over the joined text and image keys (text first), no text queries: CLEAR's image rows
alone. Its image tokens are made inside the model from a 4-D latent (the grid is the latent over the patch
size). Generic route."""

from __future__ import annotations


import torch

from .base import ModelFamily, grid_from_latent, latent_tokens
from .examples import GRID, T, latent_call, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    return latent_call(model, text_len, height, width, batch, dtype, device, text_dim="context_in_dim", timestep=0.5)


def _prx():
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=1, axes_dim=[8, 8])
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=randn(1, T, 32), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "PRX (PRXTransformer2DModel)": _prx,
}


FAMILY = ModelFamily(
    name="prx",
    tiny_models=TINY_MODELS,
    class_names=("PRXTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=11,
)
