"""Chroma: FLUX.1's blocks (the same attention processor, so the same dedicated CLEAR processor),
the grid in ``img_ids``, and a text padding mask over the joint sequence that ChromaPipeline always
passes: valid queries x valid keys, so padded text queries see nothing (CLEAR gives them zero output,
as scaled_dot_product_attention does)."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .base import ModelFamily, flux_like_inputs, grid_from_ids, packed_tokens
from .flux import ClearFluxAttnProcessor


def example_inputs(model, text_len, height, width, batch, dtype, device):
    inputs = flux_like_inputs(model, text_len, height, width, batch, dtype, device)
    inputs["attention_mask"] = torch.ones(batch, text_len + height * width, dtype=dtype, device=device)
    return inputs


FAMILY = ModelFamily(
    name="chroma",
    class_names=("ChromaTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_ids,
    image_tokens=packed_tokens,
    processors={FluxAttnProcessor: ClearFluxAttnProcessor},
    order=5,
)
