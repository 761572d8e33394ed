"""HunyuanImage 2.1: image tokens first, made inside the model from a 4-D latent (the grid is the
latent's shape over the patch size), the text padding in ``encoder_attention_mask`` (a key padding
mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens
from .examples import GRID, T, padding, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    ph, pw = tuple(cfg.patch_size)[-2:]
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * ph, width * pw),
                timestep=torch.full((batch,), 500.0, dtype=dtype, device=device),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool, device=device), return_dict=False)


def _hunyuanimage():
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=32,
                                           rope_axes_dim=(8, 8))
    return model, dict(hidden_states=randn(1, 4, *GRID), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=randn(1, T, 32), encoder_attention_mask=padding(), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "HunyuanImage (HunyuanImageTransformer2DModel)": _hunyuanimage,
}


FAMILY = ModelFamily(
    name="hunyuanimage",
    tiny_models=TINY_MODELS,
    class_names=("HunyuanImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=7,
)
