"""PixArt: analyzed only. Its image tokens attend to each other and to the text through separate
(cross) attention, never jointly, so there is nothing to convert; analysis says so."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.caption_channels),
                timestep=torch.full((batch,), 500, device=device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


FAMILY = ModelFamily(
    name="pixart",
    class_names=("PixArtTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=50,
)
