"""Ernie-Image: one stream of image tokens then text tokens (the model concatenates them before its
blocks), the image made inside the model from a 4-D latent (the grid is the latent's shape over the
patch size), the text padding from ``text_lens`` (a key padding mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                timestep=torch.full((batch,), 0.5, dtype=dtype, device=device), text_bth=t(batch, text_len, cfg.text_in_dim),
                text_lens=torch.full((batch,), text_len, device=device), return_dict=False)


FAMILY = ModelFamily(
    name="ernie-image",
    class_names=("ErnieImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=8,
)
