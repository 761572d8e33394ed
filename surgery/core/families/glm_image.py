"""GLM-Image: text first, image tokens made inside the model from a 4-D latent (the grid is the
latent's shape over the patch size). Its processor has no dedicated CLEAR version: the generic route
sends its one joint SDPA call to CLEAR. Text-to-image only: image editing appends cached keys of
reference images (``kv_caches``), which are not on the generated image's grid."""

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
    tokens = height * width
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                prior_token_id=torch.zeros(batch, tokens, dtype=torch.long, device=device),
                prior_token_drop=torch.zeros(batch, tokens, dtype=torch.bool, device=device),
                timestep=torch.full((batch,), 500, device=device), target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=dtype, device=device), return_dict=False)


def _glm_image():
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
                                       prior_vq_quantizer_codebook_size=32)
    size = torch.tensor([[GRID[0] * 16.0, GRID[1] * 16.0]])
    tokens = GRID[0] * GRID[1]
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=randn(1, T, 32),
                       prior_token_id=torch.zeros(1, tokens, dtype=torch.long),
                       prior_token_drop=torch.zeros(1, tokens, dtype=torch.bool), timestep=torch.tensor([500]),
                       target_size=size, crop_coords=torch.zeros(1, 2), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "GLM-Image (GlmImageTransformer2DModel)": _glm_image,
}


FAMILY = ModelFamily(
    name="glm-image",
    tiny_models=TINY_MODELS,
    class_names=("GlmImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    order=4,
)
