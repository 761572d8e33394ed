"""Z-Image: image and caption each padded to a multiple of 32 tokens (learned pad tokens), refined apart, then
joined once, before the main blocks, into one sequence per sample: [image, image padding, caption, caption
padding], samples of unequal length padded at the end (a key mask). CLEAR takes the image's own tokens as the
image and every other token as global (the pad tokens are seen by every query, as in the stock model). The join
is declared here; the grid is the latent over the patch size (one frame, one size for the whole batch; the
"omni" mode with condition images is refused). Generic route."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, PackedSequence
from .examples import GRID, T, randn


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(x=[t(cfg.in_channels, 1, height * 2, width * 2) for _ in range(batch)],
                t=torch.full((batch,), 0.5, dtype=dtype, device=device),
                cap_feats=[t(text_len, cfg.cap_feat_dim) for _ in range(batch)], return_dict=False)


def grid_from_call(model, bound: dict) -> tuple[int, int]:
    images = bound.get("x")
    if not images or isinstance(images[0], list):
        raise GridError("Z-Image's omni mode (condition images in x) is not converted: one target image per sample")
    if len({tuple(x.shape) for x in images}) != 1 or images[0].shape[1] != bound.get("f_patch_size", 1):
        raise GridError(f"Z-Image latents of one size and one frame per call, got {[tuple(x.shape) for x in images]}")
    patch = bound.get("patch_size", 2)
    return images[0].shape[-2] // patch, images[0].shape[-1] // patch


def image_tokens(model, bound: dict) -> int:
    height, width = grid_from_call(model, bound)
    return height * width


def fresh_for_trace(model) -> None:
    model.rope_embedder.freqs_cis = None  # made on the first call (in the traced graph when the trace is first)


def _zimage():
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    return model, dict(x=[randn(4, 1, GRID[0] * 2, GRID[1] * 2)], t=torch.tensor([0.5]), cap_feats=[randn(T, 32)],
                       return_dict=False)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Z-Image (ZImageTransformer2DModel)": _zimage,
}


FAMILY = ModelFamily(
    name="z-image",
    tiny_models=TINY_MODELS,
    class_names=("ZImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_call,
    image_tokens=image_tokens,
    packed=PackedSequence("image_first", ("layers",)),
    fresh_for_trace=fresh_for_trace,
    order=15,
)
