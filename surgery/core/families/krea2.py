"""Krea 2: packed image tokens after the text; the grid in the image tokens' rows of
``position_ids`` (text tokens first, then the image's (0, row, col)); the text padding in
``encoder_attention_mask`` (a key padding mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, grid_of_ids, packed_tokens
from .examples import GRID, T, padding, randn


def grid(model, bound: dict) -> tuple[int, int]:
    ids, tokens = bound.get("position_ids"), packed_tokens(model, bound)
    if ids is None or ids.ndim != 2 or ids.shape[0] < tokens:
        raise GridError(f"{type(model).__name__}: position_ids (text + image tokens, 3) are needed for the image grid")
    return grid_of_ids(ids[-tokens:], "the image rows of position_ids")


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    positions = torch.zeros(text_len + height * width, 3, dtype=dtype, device=device)
    index = torch.arange(height * width, device=device)
    positions[text_len:, 1], positions[text_len:, 2] = index // width, index % width
    return dict(hidden_states=t(batch, height * width, cfg.in_channels),
                encoder_hidden_states=t(batch, text_len, cfg.num_text_layers, cfg.text_hidden_dim),
                timestep=torch.full((batch,), 0.5, dtype=dtype, device=device), position_ids=positions,
                encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool, device=device), return_dict=False)


def _krea2():
    from diffusers import Krea2Transformer2DModel

    model = Krea2Transformer2DModel(in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64, timestep_embed_dim=32,
                                    text_hidden_dim=32, num_text_layers=2, text_num_attention_heads=2,
                                    text_num_key_value_heads=2, text_intermediate_size=64,
                                    num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    positions = torch.zeros(T + GRID[0] * GRID[1], 3)  # text tokens first, then the image grid
    index = torch.arange(GRID[0] * GRID[1])
    positions[T:, 1], positions[T:, 2] = index // GRID[1], index % GRID[1]
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 2, 32),
                       timestep=torch.tensor([0.5]), position_ids=positions, encoder_attention_mask=padding(),
                       return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Krea2 (Krea2Transformer2DModel)": _krea2,
}


FAMILY = ModelFamily(
    name="krea2",
    tiny_models=TINY_MODELS,
    class_names=("Krea2Transformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid,
    image_tokens=packed_tokens,
    order=10,
)
