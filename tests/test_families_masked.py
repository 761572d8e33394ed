"""Families whose prompts are padded and masked (Chroma, QwenImage and its ControlNet, HunyuanImage,
Ernie-Image, Krea 2): converted, they equal the stock model at a covering radius with prompts of different
lengths in one batch, and the padding works as in the stock model."""

import pytest
import torch

from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins.masking import OWN_ROW, VALID, ZEROED, MaskError, text_padding
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, image_grid, remove_clear
from clear_surgery.surgery.tools import coverage
from conftest import coverage_model, model_call, rel_err

T = coverage.T
LENGTHS = (T, 3)  # valid text tokens of the two samples


def _valid():
    return torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]


def _batch_of_two(inputs):
    """The coverage example call, twice (different random values), with the second prompt padded."""
    gen = torch.Generator().manual_seed(4)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            value = value.repeat(2, *([1] * (value.dim() - 1)))
            if value.is_floating_point() and name not in ("attention_mask", "encoder_hidden_states_mask"):
                value = value + torch.randn(value.shape, generator=gen)
        elif name == "img_shapes":
            value = value * 2
        out[name] = value
    return out


def _chroma_float(inputs):  # ChromaPipeline's mask: float 0/1 over text + image
    inputs["attention_mask"] = torch.cat([_valid().float(), torch.ones(2, 15)], 1)


def _chroma_bool(inputs):
    inputs["attention_mask"] = torch.cat([_valid(), torch.ones(2, 15, dtype=torch.bool)], 1)


def _qwen(inputs):
    inputs["encoder_hidden_states_mask"] = _valid().float()


def _hunyuan(inputs):
    inputs["encoder_attention_mask"] = _valid()


def _krea2(inputs):
    inputs["encoder_attention_mask"] = _valid()


def _ernie(inputs):
    inputs["text_lens"] = torch.tensor(LENGTHS)


# family row -> (how its call carries the padding, the text input, whether padded keys are hidden)
CASES = {
    "chroma-float": ("Chroma (ChromaTransformer2DModel)", _chroma_float, "encoder_hidden_states", False),
    "chroma-bool": ("Chroma (ChromaTransformer2DModel)", _chroma_bool, "encoder_hidden_states", True),
    "qwenimage": ("QwenImage (QwenImageTransformer2DModel)", _qwen, "encoder_hidden_states", True),
    "qwenimage-controlnet": ("QwenImage ControlNet (QwenImageControlNetModel)", _qwen, "encoder_hidden_states", True),
    "hunyuanimage": ("HunyuanImage (HunyuanImageTransformer2DModel)", _hunyuan, "encoder_hidden_states", True),
    "ernie-image": ("Ernie-Image (ErnieImageTransformer2DModel)", _ernie, "text_bth", True),
    "krea2": ("Krea2 (Krea2Transformer2DModel)", _krea2, "encoder_hidden_states", True),
}


def _model_and_inputs(family):
    model, inputs = coverage_model(family)
    return model, _batch_of_two(inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_equals_stock_at_a_covering_radius(case):
    family, pad, text_input, hidden = CASES[case]
    model, inputs = _model_and_inputs(family)
    pad(inputs)
    stock = model_call(model, inputs)
    apply_clear(model, ClearConfig(radius=1000))  # converted, then re-traced: only the attention changed
    assert rel_err(model_call(model, inputs), stock) < 1e-5
    before = get_clear_state(model).analysis
    remove_clear(model)
    # the padding works as in the stock model: the padded text tokens' values reach the output only when
    # the mask does not hide them (Chroma's float mask down-weights them)
    changed = dict(inputs)
    noise = torch.zeros_like(inputs[text_input])
    noise[1, LENGTHS[1]:] = 10.0
    changed[text_input] = inputs[text_input] + noise
    stock_changed = model_call(model, changed)
    apply_clear(model, ClearConfig(radius=1.5), analysis=before, verify=False)  # verified above
    clear, clear_changed = model_call(model, inputs), model_call(model, changed)
    if hidden:
        assert rel_err(stock_changed, stock) < 1e-6 and rel_err(clear_changed, clear) < 1e-6
    else:
        assert rel_err(stock_changed, stock) > 1e-3 and rel_err(clear_changed, clear) > 1e-3
    assert rel_err(clear, stock) > 1e-3  # and r=1.5 is local enough to change the output
    with image_grid(*coverage.GRID):  # the grid read from the call is the true one
        assert rel_err(model_call(model, inputs), clear) < 1e-12
    with image_grid(*reversed(coverage.GRID)):
        assert rel_err(model_call(model, inputs), clear) > 1e-3


def test_mask_forms_read_as_clear_takes_them():
    layout = TokenLayout(3, True, 2, 2)
    valid = torch.tensor([[True, True, False] + [True] * 4, [True] * 7])
    bias, rule = text_padding(valid[:, None, None, :], layout, 2)  # key padding
    assert rule is None and torch.equal(bias, torch.tensor([[0, 0, float("-inf")], [0, 0, 0]]))
    bias, rule = text_padding(valid[:, None, None, :] & valid[:, None, :, None], layout, 2)  # bool product
    assert rule[0].tolist() == [VALID, VALID, ZEROED, VALID, VALID, VALID, VALID] and not rule[1].any()
    f = valid.float()
    bias, rule = text_padding(f[:, None, None, :] * f[:, None, :, None], layout, 2)  # Chroma's float product
    assert torch.equal(bias, torch.tensor([[0.0, 0.0, -1.0], [0, 0, 0]])) and rule[0, 2] == OWN_ROW
    assert text_padding(torch.ones(2, 1, 1, 7, dtype=torch.bool), layout, 2) == (None, None)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([True] * 3 + [False] + [True] * 3), "hides or weighs image tokens"),
    (torch.tensor([0.0] * 3 + [0.5] + [0.0] * 3), "hides or weighs image tokens"),
    (torch.ones(7, 7, dtype=torch.bool).tril(), "image queries see different keys"),
    (torch.ones(2, 3, 7, 7, dtype=torch.bool).index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([0]),
                                                          torch.tensor([1])), torch.tensor(False)), "differs between heads"),
    (torch.ones(7, dtype=torch.long), "bool or float masks only"),
    (torch.ones(6, dtype=torch.bool), "does not end in the 7 keys"),
])
def test_masks_clear_cannot_express_are_refused(mask, message):
    with pytest.raises(MaskError, match=message):
        text_padding(mask, TokenLayout(3, True, 2, 2), 2)


def test_a_mask_clear_cannot_express_fails_the_call_not_silently():
    family, pad, *_ = CASES["qwenimage"]
    model, inputs = _model_and_inputs(family)
    apply_clear(model, ClearConfig(radius=1000))
    bad = dict(inputs)
    bad["encoder_hidden_states_mask"] = torch.ones(2, T)
    with torch.no_grad():
        model(**bad)  # all valid: fine
    from clear_surgery.plugins import attention

    q = torch.randn(1, 3 + 4, 1, 16)
    with pytest.raises(MaskError, match="image"):
        attention(q, q, q, text_len=3, text_first=True, height=2, width=2, radius=9,
                  attn_mask=torch.tensor([True] * 6 + [False]))
