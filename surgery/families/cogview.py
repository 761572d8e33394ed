"""CogView4 and CogView3-Plus: text first, image tokens made inside the model from a 4-D latent (the
grid is the latent's shape over the patch size). Generic route; the tile layout does not hook in
(the patch embedding is fused with the text projection)."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    size = torch.tensor([[height * p * 8.0, width * p * 8.0]] * batch, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                timestep=torch.full((batch,), 500, device=device), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=dtype, device=device), return_dict=False)


FAMILY = ModelFamily(
    name="cogview",
    class_names=("CogView4Transformer2DModel", "CogView3PlusTransformer2DModel"),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=3,
)
