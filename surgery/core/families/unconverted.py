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


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=32)
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=randn(1, T, 32),
                       encoder_attention_mask=torch.ones(1, T, dtype=torch.bool), return_dict=False)


def _zimage():
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 64, 64])
    return model, dict(x=[randn(4, 1, GRID[0] * 2, GRID[1] * 2)], t=torch.tensor([0.5]), cap_feats=[randn(T, 32)],
                       return_dict=False)


def _ideogram4():
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        intermediate_size=64, adaln_dim=16, llm_features_dim=32, mrope_section=(4, 2, 2))
    # one packed sequence: text tokens (indicator 3), then the image grid (indicator 2, offset positions)
    length, index = T + GRID[0] * GRID[1], torch.arange(GRID[0] * GRID[1])
    positions = torch.zeros(1, length, 3, dtype=torch.long)
    positions[0, :T, 0] = torch.arange(T)
    positions[0, T:, 1], positions[0, T:, 2] = index // GRID[1] + 65536, index % GRID[1] + 65536
    indicator = torch.full((1, length), 3, dtype=torch.long)
    indicator[0, T:] = 2
    return model, dict(hidden_states=randn(1, length, 16), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=randn(1, length, 32), position_ids=positions,
                       segment_ids=torch.zeros(1, length, dtype=torch.long), indicator=indicator, return_dict=False)


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
    "Lumina2 (Lumina2Transformer2DModel)": _lumina2,
    "Z-Image (ZImageTransformer2DModel)": _zimage,
    "Ideogram 4 (Ideogram4Transformer2DModel)": _ideogram4,
    "Sana (SanaTransformer2DModel)": _sana,
}
