"""NucleusMoE-Image: image queries over the joined image and text keys (image first), no text queries:
CLEAR's image rows alone. Packed image tokens, the grid in ``img_shapes`` (as QwenImage). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, packed_tokens
from .examples import GRID, T, randn
from .qwenimage import grid_from_shapes


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, height * width, cfg.in_channels), img_shapes=[(1, height, width)] * batch,
                encoder_hidden_states=t(batch, text_len, cfg.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(batch, text_len, dtype=dtype, device=device),
                timestep=torch.full((batch,), 0.5, dtype=dtype, device=device), return_dict=False)


def _nucleus_moe():
    from diffusers import NucleusMoEImageTransformer2DModel

    # MoE off: expert routing does not touch attention
    model = NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                                              moe_enabled=False)
    return model, dict(hidden_states=randn(1, 15, 16), img_shapes=[(1, *GRID)], encoder_hidden_states=randn(1, T, 32),
                       encoder_hidden_states_mask=torch.ones(1, T), timestep=torch.tensor([0.5]), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "NucleusMoE-Image (NucleusMoEImageTransformer2DModel, MoE off)": _nucleus_moe,
}


FAMILY = ModelFamily(
    name="nucleus-moe-image",
    tiny_models=TINY_MODELS,
    class_names=("NucleusMoEImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_shapes,
    image_tokens=packed_tokens,
    order=12,
)
