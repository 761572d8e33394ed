"""Architectures in diffusers that clear-surgery analyzes but does not convert (the coverage table's "no"
rows, each with its reason there): their tiny configs and example calls. No ``FAMILY`` here: the registry
does not claim these classes."""

from __future__ import annotations

import torch

from .examples import GRID, T, randn


def _qwenimage21():
    from diffusers import QwenImage21Transformer2DModel

    model = QwenImage21Transformer2DModel(in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6))
    # image latents fill 2x2-token slots placed after the text in the vision-language sequence: an even grid
    height, width = 4, 6
    slots = height * width // 4
    img_mask = torch.cat([torch.zeros(1, T, dtype=torch.bool), torch.ones(1, slots, dtype=torch.bool)], 1)
    return model, dict(hidden_states=randn(1, height * width, 16), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_shapes=[[(1, height, width)]], img_mask=img_mask,
                       return_dict=False), T, height * width


def _sana():
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                   cross_attention_dim=32, caption_channels=32, sample_size=16)
    return model, dict(hidden_states=randn(1, 4, *GRID), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([500]), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "QwenImage 2.1 (QwenImage21Transformer2DModel)": _qwenimage21,
    "Sana (SanaTransformer2DModel)": _sana,
}
