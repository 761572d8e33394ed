"""CogView4 and CogView3-Plus: text first, image tokens made inside the model from a 4-D latent (the
grid is the latent's shape over the patch size). Generic route; the tile layout does not hook in
(the patch embedding is fused with the text projection)."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens
from .examples import GRID, T, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    size = torch.tensor([[height * p * 8.0, width * p * 8.0]] * batch, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                timestep=torch.full((batch,), 500, device=device), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=dtype, device=device), return_dict=False)


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                       time_embed_dim=16, condition_dim=8, in_channels=4, out_channels=4,
                                       rope_axes_dim=(8, 8))
    size = torch.tensor([[GRID[0] * 16, GRID[1] * 16]])
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([500]), original_size=size, target_size=size,
                       crop_coords=torch.zeros(1, 2), return_dict=False)


def _cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, out_channels=4, text_embed_dim=32, time_embed_dim=16,
                                           condition_dim=8, pos_embed_max_size=32, sample_size=16)
    size = torch.tensor([[GRID[0] * 16, GRID[1] * 16]])
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([500]), original_size=size, target_size=size,
                       crop_coords=torch.zeros(1, 2), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "CogView4 (CogView4Transformer2DModel)": _cogview4,
    "CogView3-Plus (CogView3PlusTransformer2DModel)": _cogview3plus,
}


FAMILY = ModelFamily(
    name="cogview",
    tiny_models=TINY_MODELS,
    class_names=("CogView4Transformer2DModel", "CogView3PlusTransformer2DModel"),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=3,
)
