"""Chroma: FLUX.1's blocks (the same attention processor, so the same dedicated CLEAR processor),
the grid in ``img_ids``, and a text padding mask over the joint sequence that ChromaPipeline always
passes: valid queries x valid keys, so padded text queries see nothing (CLEAR gives them zero output,
as scaled_dot_product_attention does)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import ModelFamily, flux_like_inputs, grid_from_ids, packed_tokens
from .examples import GRID, T, padding, randn, token_ids
from .flux import ClearFluxAttnProcessor


def example_inputs(model, text_len, height, width, batch, dtype, device):
    inputs = flux_like_inputs(model, text_len, height, width, batch, dtype, device)
    inputs["attention_mask"] = torch.ones(batch, text_len + height * width, dtype=dtype, device=device)
    return inputs


def _chroma():
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6),
                                     approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    img = token_ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    # ChromaPipeline always passes the text padding mask (as a joint text+image mask, float 0/1)
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img, txt_ids=torch.zeros(T, 3),
                       attention_mask=torch.cat([padding(torch.float32), torch.ones(1, 15)], 1), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Chroma (ChromaTransformer2DModel)": _chroma,
}


FAMILY = ModelFamily(
    name="chroma",
    tiny_models=TINY_MODELS,
    class_names=("ChromaTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_ids,
    image_tokens=packed_tokens,
    processors={FluxAttnProcessor: ClearFluxAttnProcessor},
    order=5,
)
