"""Lumina2: caption and image refined apart (a text-only and an image-only stack), then joined once, before the
main blocks, into one packed sequence per sample: [caption, image], samples of unequal caption length padded at
their end (a key mask). The join is declared here (the graph cannot show it at the attention calls); the image
grid is the 4-D latent over the patch size. Analyzed at run time (torch.export stops at the per-sample caption
lengths). Generic route."""

from __future__ import annotations


import torch

from .base import ModelFamily, PackedSequence, grid_from_latent, latent_tokens
from .examples import GRID, T, latent_call, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    return dict(latent_call(model, text_len, height, width, batch, dtype, device, text_dim="cap_feat_dim", timestep=0.5),
                encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool, device=device))


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64), cap_feat_dim=32)
    return model, dict(hidden_states=randn(1, 4, GRID[0] * 2, GRID[1] * 2), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=randn(1, T, 32),
                       encoder_attention_mask=torch.ones(1, T, dtype=torch.bool), return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Lumina2 (Lumina2Transformer2DModel)": _lumina2,
}


FAMILY = ModelFamily(
    name="lumina2",
    tiny_models=TINY_MODELS,
    class_names=("Lumina2Transformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    packed=PackedSequence("text_first", ("layers",), padding_after_image=True),
    order=14,
)
