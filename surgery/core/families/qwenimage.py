"""QwenImage and its ControlNet: packed image tokens after the text, the grid in ``img_shapes``
((frames, rows, cols) per image of each sample), the text padding in ``encoder_hidden_states_mask``
(a key padding mask: padded text keys are hidden, padded text queries still see the valid keys).
Generic route. The edit models' reference images follow the generated one, each on its own grid."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, forward_signature, packed_tokens
from .examples import GRID, T, padding, randn


def _shapes(model, bound: dict) -> tuple[tuple[int, int], ...]:
    shapes = bound.get("img_shapes")
    if not shapes:
        raise GridError(f"{type(model).__name__} was called without img_shapes; CLEAR needs them for the image grid")
    per_sample = [tuple(tuple(int(v) for v in image) for image in sample) for sample in shapes] \
        if isinstance(shapes[0], (list, tuple)) and isinstance(shapes[0][0], (list, tuple)) else [tuple(shapes)]
    if len(set(per_sample)) != 1 or any(frames != 1 for frames, _, _ in per_sample[0]):
        raise GridError(f"img_shapes {shapes}: CLEAR takes images of one frame, the same for the whole batch")
    return tuple((h, w) for _, h, w in per_sample[0])


def grid_from_shapes(model, bound: dict) -> tuple[int, int]:
    """The first image's grid (the generated one)."""
    return _shapes(model, bound)[0]


def images_from_shapes(model, bound: dict) -> tuple[tuple[int, int], ...]:
    """The edit models' reference images, after the generated one, each on its own grid."""
    return _shapes(model, bound)[1:]


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    inputs = dict(hidden_states=t(batch, height * width, cfg.in_channels),
                  encoder_hidden_states=t(batch, text_len, cfg.joint_attention_dim),
                  encoder_hidden_states_mask=torch.ones(batch, text_len, dtype=dtype, device=device),
                  timestep=torch.full((batch,), 0.5, dtype=dtype, device=device),
                  img_shapes=[[(1, height, width)]] * batch, return_dict=False)
    if "controlnet_cond" in forward_signature(type(model)).parameters:
        inputs["controlnet_cond"] = t(batch, height * width, cfg.in_channels)
    return inputs


def _qwenimage():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=32, in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=randn(1, 15, 16), encoder_hidden_states=randn(1, T, 32),
                       encoder_hidden_states_mask=padding(torch.float32), timestep=torch.tensor([0.5]),
                       img_shapes=[[(1, *GRID)]], return_dict=False)


def _qwenimage_controlnet():
    from diffusers import QwenImageControlNetModel

    model = QwenImageControlNetModel(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=32, in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    model, inputs = model, _qwenimage()[1]
    inputs["controlnet_cond"] = randn(1, 15, 16)
    return model, inputs


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "QwenImage (QwenImageTransformer2DModel)": _qwenimage,
    "QwenImage ControlNet (QwenImageControlNetModel)": _qwenimage_controlnet,
}


FAMILY = ModelFamily(
    name="qwenimage",
    tiny_models=TINY_MODELS,
    controlnets=("QwenImageControlNetModel",),
    class_names=("QwenImageTransformer2DModel", "QwenImageControlNetModel"),
    example_inputs=example_inputs,
    grid_from_call=grid_from_shapes,
    image_tokens=packed_tokens,
    images_from_call=images_from_shapes,
    order=6,
)
