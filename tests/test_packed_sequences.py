"""Packed sequences: text and image joined once, before the blocks (Lumina2, Z-Image, Ideogram 4). The family
declares the join; CLEAR takes the image's tokens as the image and every other token (captions, padding, pad
tokens) as global. Each model is checked against its stock self whose joint attention calls are given CLEAR's
mask, built here from grid coordinates, and against the stock model at a radius covering the grid."""

import pytest
import torch

from clear_surgery.surgery import ClearConfig, analyze, apply_clear, build_tiny_model, remove_clear
from clear_surgery.surgery.core.processors import padding_before_image
from conftest import model_call, perturbed, rel_err

LUMINA2 = "Lumina2 (Lumina2Transformer2DModel)"
ZIMAGE = "Z-Image (ZImageTransformer2DModel)"
IDEOGRAM4 = "Ideogram 4 (Ideogram4Transformer2DModel)"
HEIGHT, WIDTH = 3, 5  # the example grid


def clear_mask(tokens: int, image_start: int, radius: float) -> torch.Tensor:
    """(tokens, tokens): image rows see every other token and the image keys within r; other rows see all."""
    image = HEIGHT * WIDTH
    y, x = torch.arange(image) // WIDTH, torch.arange(image) % WIDTH
    mask = torch.ones(tokens, tokens, dtype=torch.bool)
    rows = slice(image_start, image_start + image)
    mask[rows, rows] = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 < radius ** 2
    return mask


class JointMasked(torch.overrides.TorchFunctionMode):
    """The stock model with ``masks[i]`` (tokens, tokens) added to the attention calls over that many tokens
    (the joint blocks'; the refiners' calls are shorter), per sample."""

    def __init__(self, masks: list[torch.Tensor]):
        super().__init__()
        self.masks = masks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            if q.shape[-2] == self.masks[0].shape[0]:
                mask = torch.stack(self.masks)[:, None]
                given = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                kwargs["attn_mask"] = mask if given is None else mask & given.bool()
                args = args[:3]
        return func(*args, **kwargs)


def _clear(model, inputs, radius):
    apply_clear(model, ClearConfig(radius=radius))
    clear = model_call(model, inputs)
    remove_clear(model)
    return clear


def assert_clear_is_the_masked_stock(model, inputs, masks):
    """CLEAR at a covering radius is the stock model; at r = 1.5 it is the stock model given ``masks`` (one per
    sample), which do mask."""
    stock = model_call(model, inputs)
    assert rel_err(_clear(model, inputs, 1000.0), stock) < 1e-5
    clear = _clear(model, inputs, 1.5)
    with JointMasked(masks):
        want = model_call(model, inputs)
    assert rel_err(clear, want) < 1e-5 and rel_err(stock, want) > 1e-4


@pytest.mark.parametrize("row, tokens, image_start", [(LUMINA2, 7 + 15, 7), (ZIMAGE, 64, 0), (IDEOGRAM4, 7 + 15, 7)])
def test_packed_families_match_an_independent_window_mask(row, tokens, image_start):
    """Lumina2: [caption, image]; Z-Image: [image, 17 image pad tokens, caption, 25 caption pad tokens];
    Ideogram 4: [text, image]."""
    model, inputs = build_tiny_model(row)[:2]
    model = perturbed(model)
    report = analyze(model)
    assert [s.module for s in report.joint_sites] == ["layers.0.attn" if row == LUMINA2 else "layers.0.attention"]
    assert report.joint_sites[0].packed and report.joint_sites[0].query_tokens == tokens
    assert_clear_is_the_masked_stock(model, inputs, [clear_mask(tokens, image_start, 1.5)])


def test_lumina2_batch_of_unequal_captions_is_padded_after_each_image():
    """Lumina2 packs [caption_i, image, padding] per sample: CLEAR moves the padding before the image for the call
    (one layout for the batch) and back."""
    model, inputs = build_tiny_model(LUMINA2)[:2]
    model = perturbed(model)
    inputs = dict(inputs, hidden_states=torch.randn(2, *inputs["hidden_states"].shape[1:]),
                  encoder_hidden_states=torch.randn(2, 7, 32), timestep=torch.tensor([0.5, 0.5]),
                  encoder_attention_mask=torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
    short = clear_mask(22, 4, 1.5)  # [4 caption tokens, image, 3 padding]: the image starts at 4
    assert_clear_is_the_masked_stock(model, inputs, [clear_mask(22, 7, 1.5), short])


def test_ideogram4_left_padding_and_block_diagonal_mask():
    """A batch whose second prompt is two tokens shorter: [2 padding, 5 text, image], the padding attending among
    itself (segment -1). The image rows are CLEAR's, the padding's rows its own (text rows keep full attention)."""
    model, inputs = build_tiny_model(IDEOGRAM4)[:2]
    model = perturbed(model)
    batch = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and k != "timestep" else v
             for k, v in inputs.items()}
    batch["timestep"] = torch.tensor([0.5, 0.5])
    batch["hidden_states"] = torch.randn_like(batch["hidden_states"])
    batch["segment_ids"] = batch["segment_ids"].clone()
    batch["segment_ids"][1, :2] = -1
    batch["indicator"] = batch["indicator"].clone()
    batch["indicator"][1, :2] = 0
    assert_clear_is_the_masked_stock(model, batch, [clear_mask(22, 7, 1.5)] * 2)


def test_zimage_batch_of_unequal_captions():
    """Z-Image pads the batch at its end, after the caption: inside CLEAR's global segment (a key mask)."""
    model, inputs = build_tiny_model(ZIMAGE)[:2]
    model = perturbed(model)
    inputs = dict(inputs, x=[torch.randn(4, 1, 6, 10) for _ in range(2)], t=torch.tensor([0.5, 0.5]),
                  cap_feats=[torch.randn(7, 32), torch.randn(40, 32)])  # 32 and 64 caption tokens once padded
    assert_clear_is_the_masked_stock(model, inputs, [clear_mask(96, 0, 1.5)] * 2)


def test_padding_before_image_orders_each_sample():
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # image of 3 tokens; text 3 and 1
    order = padding_before_image(valid[:, None, None, :], 3)
    assert order.tolist() == [[0, 1, 2, 3, 4, 5], [0, 4, 5, 1, 2, 3]]
    assert padding_before_image(torch.ones(2, 6, dtype=torch.bool), 3) is None
    with pytest.raises(ValueError, match="padding must follow each sample's image"):
        padding_before_image(torch.tensor([[False] + [True] * 5]), 3)
