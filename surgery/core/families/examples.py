"""The example call every family's tiny models share: its text length and image grid (small, non-square,
with token counts that match no channel size, so text and image streams are told apart by length alone)
and the few tensors the tiny models' example calls build."""

from __future__ import annotations

import torch

T = 7  # text tokens of the example call
GRID = (3, 5)  # its image grid (rows, columns)
VALID = 5  # families with text padding masks: the example prompt is padded after this many tokens


def padding(dtype=torch.bool) -> torch.Tensor:
    """(1, T) text padding mask: the first VALID tokens are kept."""
    return (torch.arange(T) < VALID)[None].to(dtype)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape)


def token_ids(columns: int, values: dict) -> torch.Tensor:
    """(grid tokens, columns) position ids: column -> function of the raster token index."""
    ids = torch.zeros(GRID[0] * GRID[1], columns)
    index = torch.arange(GRID[0] * GRID[1])
    for column, value in values.items():
        ids[:, column] = value(index)
    return ids


def latent_call(model, text_len, height, width, batch, dtype, device, *, text_dim: str, timestep: float) -> dict:
    """The example call of a model that patchifies a 4-D latent itself: the latent (the grid times the patch
    size), text embeddings of ``model.config[text_dim]`` channels, and one timestep."""
    cfg = model.config
    return dict(hidden_states=torch.randn(batch, cfg.in_channels, height * cfg.patch_size, width * cfg.patch_size,
                                          dtype=dtype, device=device),
                encoder_hidden_states=torch.randn(batch, text_len, cfg[text_dim], dtype=dtype, device=device),
                timestep=torch.full((batch,), timestep, dtype=dtype, device=device), return_dict=False)
