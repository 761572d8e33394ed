"""Families whose image grid comes from position ids or the model's own patchify step (HiDream,
Krea 2, Bria FIBO): converted, they equal the stock model at a covering radius on a non-square grid
with a batch of two, and a call whose grid CLEAR cannot read is refused with the reason."""

import pytest
import torch

from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, remove_clear
from clear_surgery.surgery.core.families import GridError, image_grid
from clear_surgery.surgery.tools import coverage
from conftest import coverage_model, model_call, rel_err

ROWS = {"hidream": "HiDream (HiDreamImageTransformer2DModel, no routed experts)",
            "krea2": "Krea2 (Krea2Transformer2DModel)", "bria-fibo": "Bria FIBO (BriaFiboTransformer2DModel)"}


def _model(name):
    return coverage_model(ROWS[name])


def _twice(inputs):
    gen = torch.Generator().manual_seed(2)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1 and name != "img_ids":
            value = value.repeat(2, *([1] * (value.dim() - 1)))
            if value.is_floating_point() and "mask" not in name:
                value = value + torch.randn(value.shape, generator=gen)
        elif name == "text_encoder_layers":
            value = [v.repeat(2, 1, 1) for v in value]
        elif name == "encoder_hidden_states_llama3":
            value = value.repeat(1, 2, 1, 1)
        out[name] = value
    if "img_ids" in inputs and inputs["img_ids"].dim() == 3:  # HiDream: per sample
        out["img_ids"] = inputs["img_ids"].repeat(2, 1, 1)
    return out


@pytest.mark.parametrize("name", list(ROWS))
def test_converted_equals_stock_at_a_covering_radius(name):
    model, inputs = _model(name)
    inputs = _twice(inputs)
    stock = model_call(model, inputs)
    apply_clear(model, ClearConfig(radius=1000))
    assert rel_err(model_call(model, inputs), stock) < 1e-5
    before = get_clear_state(model).analysis
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=1.5), analysis=before, verify=False)  # verified above
    local = model_call(model, inputs)
    assert rel_err(local, stock) > 1e-3
    # the grid read from the call is the true one: the same output as with the grid given by hand, and
    # another output with the grid transposed
    with image_grid(*coverage.GRID):
        assert rel_err(model_call(model, inputs), local) < 1e-12
    with image_grid(*reversed(coverage.GRID)):
        assert rel_err(model_call(model, inputs), local) > 1e-3


def test_hidream_latents_square_convert_and_padded_ones_are_refused():
    model, inputs = _model("hidream")
    call = {k: v for k, v in inputs.items() if k not in ("hidden_states", "hidden_states_masks", "img_sizes", "img_ids")}
    square = dict(call, hidden_states=torch.randn(1, 4, 6, 6))  # as the pipeline passes it: patchified inside
    stock = model_call(model, square)
    apply_clear(model, ClearConfig(radius=1000))
    assert rel_err(model_call(model, square), stock) < 1e-5
    with pytest.raises(GridError, match="pads a non-square image"):
        model_call(model, dict(call, hidden_states=torch.randn(1, 4, 4, 6)))  # 2x3 tokens, padded to 15


def test_krea2_grid_from_position_ids_and_refusal():
    model, inputs = _model("krea2")
    apply_clear(model, ClearConfig(radius=1000))
    shuffled = inputs["position_ids"].clone()
    shuffled[-15:] = shuffled[-15:].flip(0)
    with pytest.raises(GridError, match="not a raster grid"):
        model_call(model, dict(inputs, position_ids=shuffled))
