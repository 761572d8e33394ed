"""AuraFlow: joint attention over learned register tokens, the text and the image (in that order); the
registers join the text segment (every query sees them, they see every key). Image tokens are made inside
the model from a 4-D latent. Generic route."""

from __future__ import annotations


import torch

from .base import ModelFamily, grid_from_latent, latent_tokens
from .examples import GRID, T, latent_call, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    return latent_call(model, text_len, height, width, batch, dtype, device, text_dim="joint_attention_dim",
                       timestep=500.0)


def register_tokens(model) -> int:
    return model.register_tokens.shape[1]


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                       pos_embed_max_size=64)
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([500.0]), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "AuraFlow (AuraFlowTransformer2DModel)": _auraflow,
}


FAMILY = ModelFamily(
    name="auraflow",
    tiny_models=TINY_MODELS,
    class_names=("AuraFlowTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    global_tokens=register_tokens,
    order=13,
)
