"""HunyuanImage 2.1: image tokens first, made inside the model from a 4-D latent (the grid is the
latent's shape over the patch size), the text padding in ``encoder_attention_mask`` (a key padding
mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    ph, pw = tuple(cfg.patch_size)[-2:]
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * ph, width * pw),
                timestep=torch.full((batch,), 500.0, dtype=dtype, device=device),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool, device=device), return_dict=False)


FAMILY = ModelFamily(
    name="hunyuanimage",
    class_names=("HunyuanImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=7,
)
