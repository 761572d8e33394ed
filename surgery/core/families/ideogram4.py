"""Ideogram 4: one packed sequence per sample, [padding, text, image] (the pipeline pads each prompt on the
left to the batch's longest), with a per-token role (``indicator``: 3 text, 2 image) and a block-diagonal mask
from ``segment_ids`` (the padding attends among itself, text and image among themselves). CLEAR takes the image
tokens (the last ones of every sample) as the image and every other token as global; the mask hides the
padding's keys from the image queries (a text bias) and the padding's own rows are text rows under their own
mask rows. The image grid comes from the image tokens' position ids. The join is declared here. Generic
route."""

from __future__ import annotations

import functools

import torch

from .base import GridError, ModelFamily, PackedSequence, fixed_grid, grid_of_ids
from .examples import GRID, T

IMAGE, TEXT = 2, 3  # the model's indicator values (OUTPUT_IMAGE_INDICATOR, LLM_TOKEN_INDICATOR)
POSITION_OFFSET = 65536  # image positions start here (the pipeline's IMAGE_POSITION_OFFSET)


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    length, index = text_len + height * width, torch.arange(height * width, device=device)
    positions = torch.zeros(batch, length, 3, dtype=torch.long, device=device)
    positions[:, :text_len] = torch.arange(text_len, device=device)[:, None]
    positions[:, text_len:, 1] = index // width + POSITION_OFFSET
    positions[:, text_len:, 2] = index % width + POSITION_OFFSET
    indicator = torch.full((batch, length), TEXT, dtype=torch.long, device=device)
    indicator[:, text_len:] = IMAGE
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, length, cfg.in_channels), timestep=torch.full((batch,), 0.5, dtype=dtype,
                                                                                      device=device),
                encoder_hidden_states=t(batch, length, cfg.llm_features_dim), position_ids=positions,
                segment_ids=torch.zeros(batch, length, dtype=torch.long, device=device), indicator=indicator,
                return_dict=False)


def _traced(tensor) -> bool:
    return torch.compiler.is_compiling() or isinstance(tensor, torch._subclasses.FakeTensor)


def image_tokens(model, bound: dict) -> int:
    indicator = bound["indicator"]
    if _traced(indicator):  # counts are values tracing cannot read: the fixed grid (image_grid) says it
        fixed = fixed_grid()
        if fixed is None:
            raise GridError("Ideogram 4's image grid comes from its indicator and position ids, which tracing "
                            "cannot read: wrap the call in clear_surgery.surgery.image_grid(height, width)")
        return fixed[0] * fixed[1]
    counts = (indicator == IMAGE).sum(-1)
    count = int(counts[0])
    if not bool((counts == count).all()) or not bool((indicator[:, indicator.shape[1] - count:] == IMAGE).all()):
        raise GridError("Ideogram 4: CLEAR needs the image tokens last in every sample, as many in each")
    return count


def grid_from_call(model, bound: dict) -> tuple[int, int]:
    count = image_tokens(model, bound)
    ids = bound["position_ids"][0, -count:]
    return grid_of_ids(ids - ids[:1], "position_ids of the image tokens")


def _ideogram4():
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(in_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                        intermediate_size=64, adaln_dim=16, llm_features_dim=32, mrope_section=(4, 2, 2))
    return model, example_inputs(model, T, *GRID, 1, torch.float32, "cpu")


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "Ideogram 4 (Ideogram4Transformer2DModel)": _ideogram4,
}


FAMILY = ModelFamily(
    name="ideogram4",
    tiny_models=TINY_MODELS,
    class_names=("Ideogram4Transformer2DModel",),
    example_inputs=example_inputs,
    grid_from_call=grid_from_call,
    image_tokens=image_tokens,
    packed=PackedSequence("text_first", ("layers",)),
    order=16,
)
