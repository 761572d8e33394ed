"""GLM-Image: text first, image tokens made inside the model from a 4-D latent (the grid is the
latent's shape over the patch size). Its processor has no dedicated CLEAR version: the generic route
sends its one joint SDPA call to CLEAR. Text-to-image only: image editing appends cached keys of
reference images (``kv_caches``), which are not on the generated image's grid."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, grid_from_latent, latent_tokens


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    size = torch.tensor([[height * p * 8.0, width * p * 8.0]] * batch, dtype=dtype, device=device)
    tokens = height * width
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                prior_token_id=torch.zeros(batch, tokens, dtype=torch.long, device=device),
                prior_token_drop=torch.zeros(batch, tokens, dtype=torch.bool, device=device),
                timestep=torch.full((batch,), 500, device=device), target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=dtype, device=device), return_dict=False)


FAMILY = ModelFamily(
    name="glm-image",
    class_names=("GlmImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=4,
)
