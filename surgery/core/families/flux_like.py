"""Other FLUX-style models (FLUX.2, FLUX.3, Bria, Bria FIBO, LongCat-Image, Ovis-Image): packed image tokens
after the text, the grid in ``img_ids``. Their attention processors have no dedicated CLEAR version:
the generic route sends their one joint SDPA call to CLEAR (the rewrite's re-trace checks that
nothing else changed)."""

from __future__ import annotations

import functools

import torch

from .base import ModelFamily, TilePlan, flux_like_inputs, grid_from_ids, images_from_ids, packed_tokens
from .examples import GRID, T, randn, token_ids


def _flux2():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                    timestep_guidance_channels=32)
    img = token_ids(4, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img[None], txt_ids=torch.zeros(1, T, 4),
                       guidance=torch.tensor([3.5]), return_dict=False)


def _flux_like(class_name):
    """FLUX-style models (packed tokens, img_ids/txt_ids): Bria, LongCat-Image, Ovis-Image."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6), pooled_projection_dim=32,
                  out_channels=16)
    model = cls(**{k: v for k, v in config.items() if k in accepted})
    img = token_ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    inputs = dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32), timestep=torch.tensor([0.5]),
                  img_ids=img, txt_ids=torch.zeros(T, 3), return_dict=False)
    if "pooled_projections" in inspect.signature(cls.forward).parameters:
        inputs["pooled_projections"] = randn(1, 32)
    return model, inputs


def _flux3():
    from diffusers import Flux3Transformer2DModel

    model = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))
    img = token_ids(4, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32),
                       timestep=torch.tensor([0.5]), img_ids=img, txt_ids=torch.zeros(T, 4), return_dict=False)


def _bria_fibo():
    from diffusers import BriaFiboTransformer2DModel

    model = BriaFiboTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
                                       text_encoder_dim=32)
    img = token_ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32),
                       text_encoder_layers=[randn(1, T, 32)] * 2, timestep=torch.tensor([0.5]), img_ids=img,
                       txt_ids=torch.zeros(T, 3), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "FLUX.2 (Flux2Transformer2DModel)": _flux2,
    "Bria (BriaTransformer2DModel)": functools.partial(_flux_like, "BriaTransformer2DModel"),
    "LongCat-Image (LongCatImageTransformer2DModel)": functools.partial(_flux_like, "LongCatImageTransformer2DModel"),
    "Ovis-Image (OvisImageTransformer2DModel)": functools.partial(_flux_like, "OvisImageTransformer2DModel"),
    "FLUX.3 (Flux3Transformer2DModel)": _flux3,
    "Bria FIBO (BriaFiboTransformer2DModel)": _bria_fibo,
}


FAMILY = ModelFamily(
    name="flux-like",
    tiny_models=TINY_MODELS,
    class_names=("Flux2Transformer2DModel", "Flux3Transformer2DModel", "BriaTransformer2DModel",
                 "BriaFiboTransformer2DModel", "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel"),
    example_inputs=flux_like_inputs,
    grid_from_call=grid_from_ids,
    image_tokens=packed_tokens,
    images_from_call=images_from_ids,  # reference images (FLUX.2: another value in the first column of the ids)
    tile_plan=TilePlan(entry_tensors=("hidden_states",), ids="img_ids"),
    order=2,
)
