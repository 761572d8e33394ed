"""HiDream-I1: image tokens first, from a 4-D latent patchified inside the model (the grid is the
latent's shape over the patch size) or already patchified (the grid in ``img_sizes``); the text
stream is the T5 tokens and two Llama layers' tokens. Generic route. HiDream pads a non-square
image's tokens to its largest size and zeroes their keys, tokens every query still attends to and
that lie on no grid: such calls are refused (square images, or exactly max_resolution, convert)."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, grid_from_latent
from .examples import GRID, T, randn, token_ids


def grid(model, bound: dict) -> tuple[int, int]:
    hidden = bound.get("hidden_states")
    if hidden is not None and hidden.ndim == 4:  # a latent, patchified inside
        height, width = grid_from_latent(model, bound)
        if height != width and height * width != model.max_seq:
            raise GridError(f"HiDream pads a non-square image ({height}x{width} tokens) to {model.max_seq} tokens "
                            "with zeroed keys that every query attends to: CLEAR takes HiDream's square images (or "
                            "images of exactly max_resolution) only")
        return height, width
    sizes = bound.get("img_sizes")  # already patchified: (batch, 2) rows and columns per sample
    if hidden is None or sizes is None:
        raise GridError("HiDream called with patchified hidden_states needs img_sizes for the image grid")
    sizes = {(int(h), int(w)) for h, w in sizes}
    (height, width), *others = sizes
    if others or height * width != hidden.shape[1]:
        raise GridError(f"img_sizes {sorted(sizes)} for {hidden.shape[1]} image tokens: CLEAR takes one unpadded "
                        "grid for the whole batch")
    return height, width


def image_tokens(model, bound: dict) -> int:
    hidden = bound["hidden_states"]
    if hidden.ndim == 4:
        height, width = grid_from_latent(model, bound)
        return height * width
    return hidden.shape[1]


def example_inputs(model, text_len, height, width, batch, dtype, device):
    """Patchified image tokens of a height x width grid (no padding at any aspect ratio); text_len = T5
    tokens + 2 x Llama tokens (one Llama token, the rest T5)."""
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    t5_dim, llama_dim = cfg.caption_channels
    ids = torch.zeros(batch, height * width, 3, device=device)
    index = torch.arange(height * width, device=device)
    ids[..., 1], ids[..., 2] = index // width, index % width
    return dict(hidden_states=t(batch, height * width, p * p * cfg.in_channels),
                hidden_states_masks=torch.ones(batch, height * width, dtype=dtype, device=device),
                img_sizes=torch.tensor([[height, width]] * batch, device=device), img_ids=ids,
                timesteps=torch.full((batch,), 500, device=device),
                encoder_hidden_states_t5=t(batch, text_len - 2, t5_dim),
                encoder_hidden_states_llama3=t(max(cfg.llama_layers) + 1, batch, 1, llama_dim),
                pooled_embeds=t(batch, cfg.text_emb_dim), return_dict=False)


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4],
                                           text_emb_dim=8, num_routed_experts=0, num_activated_experts=1,
                                           axes_dims_rope=(4, 2, 2), max_resolution=(GRID[0] * 2, GRID[1] * 2), llama_layers=[0, 1])
    # Its text stream is the T5 tokens, the last Llama layer's and the block's Llama layer's: 3 * T
    # tokens. No routed experts: the MoE routing calls .numpy(), which torch.export cannot trace
    # (the attention does not depend on it). Image tokens patchified already (the pipeline's 4-D latent
    # is patchified inside and padded to max_resolution unless square).
    ids = token_ids(3, {1: lambda i: i // GRID[1], 2: lambda i: i % GRID[1]})[None]
    return model, dict(hidden_states=randn(1, 15, 16), hidden_states_masks=torch.ones(1, 15),
                       img_sizes=torch.tensor([GRID]), img_ids=ids, timesteps=torch.tensor([500]),
                       encoder_hidden_states_t5=randn(1, T, 8), encoder_hidden_states_llama3=randn(2, 1, T, 4),
                       pooled_embeds=randn(1, 8), return_dict=False), 3 * T


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "HiDream (HiDreamImageTransformer2DModel, no routed experts)": _hidream,
}


FAMILY = ModelFamily(
    name="hidream",
    tiny_models=TINY_MODELS,
    class_names=("HiDreamImageTransformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid,
    image_tokens=image_tokens,
    order=9,
)
