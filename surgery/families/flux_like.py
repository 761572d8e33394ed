"""Other FLUX-style models (FLUX.2, FLUX.3, Bria, Bria FIBO, LongCat-Image, Ovis-Image): packed image tokens
after the text, the grid in ``img_ids``. Their attention processors have no dedicated CLEAR version:
the generic route sends their one joint SDPA call to CLEAR (the rewrite's re-trace checks that
nothing else changed)."""

from __future__ import annotations

from .base import ModelFamily, TilePlan, flux_like_inputs, grid_from_ids, images_from_ids, packed_tokens

FAMILY = ModelFamily(
    name="flux-like",
    class_names=("Flux2Transformer2DModel", "Flux3Transformer2DModel", "BriaTransformer2DModel",
                 "BriaFiboTransformer2DModel", "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel"),
    example_inputs=flux_like_inputs,
    grid_from_call=grid_from_ids,
    image_tokens=packed_tokens,
    images_from_call=images_from_ids,  # reference images (FLUX.2: another value in the first column of the ids)
    tile_plan=TilePlan(entry_tensors=("hidden_states",), ids="img_ids"),
    order=2,
)
