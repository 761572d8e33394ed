"""Ernie-Image: one stream of image tokens then text tokens (the model concatenates them before its
blocks), the image made inside the model from a 4-D latent (the grid is the latent's shape over the
patch size), the text padding from ``text_lens`` (a key padding mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens
from .examples import GRID, VALID, T, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                timestep=torch.full((batch,), 0.5, dtype=dtype, device=device), text_bth=t(batch, text_len, cfg.text_in_dim),
                text_lens=torch.full((batch,), text_len, device=device), return_dict=False)


def _ernie_image():
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=64,
                                         in_channels=4, out_channels=4, text_in_dim=32, rope_axes_dim=(4, 6, 6))
    return model, dict(hidden_states=randn(1, 4, *GRID), timestep=torch.tensor([0.5]), text_bth=randn(1, T, 32),
                       text_lens=torch.tensor([VALID]), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Ernie-Image (ErnieImageTransformer2DModel)": _ernie_image,
}


FAMILY = ModelFamily(
    name="ernie-image",
    tiny_models=TINY_MODELS,
    class_names=("ErnieImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=8,
)
