"""Krea 2: packed image tokens after the text; the grid in the image tokens' rows of
``position_ids`` (text tokens first, then the image's (0, row, col)); the text padding in
``encoder_attention_mask`` (a key padding mask). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, grid_of_ids, packed_tokens


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


FAMILY = ModelFamily(
    name="krea2",
    class_names=("Krea2Transformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid,
    image_tokens=packed_tokens,
    order=10,
)
