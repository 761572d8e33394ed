"""Global tokens beside the text (AuraFlow's registers): CLEAR treats them as text, so every query sees them
and they see every key. Checked against the stock model whose attention call is given that mask."""

import torch

from clear_surgery.surgery import ClearConfig, analyze, apply_clear, build_tiny_model, remove_clear
from conftest import model_call, perturbed, rel_err

AURAFLOW = "AuraFlow (AuraFlowTransformer2DModel)"


def clear_mask(text: int, height: int, width: int, radius: float, text_first: bool) -> torch.Tensor:
    """(tokens, tokens) of CLEAR built here from grid coordinates: text rows see all, image rows the text and
    the image keys within r."""
    y, x = torch.arange(height * width) // width, torch.arange(height * width) % width
    near = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 < radius ** 2
    image_rows = torch.cat([torch.ones(height * width, text, dtype=torch.bool), near] if text_first else
                           [near, torch.ones(height * width, text, dtype=torch.bool)], 1)
    text_rows = torch.ones(text, text + height * width, dtype=torch.bool)
    return torch.cat([text_rows, image_rows] if text_first else [image_rows, text_rows], 0)


class Masked(torch.overrides.TorchFunctionMode):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            kwargs["attn_mask"] = self.mask
        return func(*args, **kwargs)


def test_registers_count_as_text_and_the_model_matches_an_independent_mask():
    model, inputs = build_tiny_model(AURAFLOW)[:2]
    model = perturbed(model)
    registers = model.register_tokens.shape[1]
    report = analyze(model)
    assert report.text_tokens == 7 + registers and [s.kind for s in report.sites] == ["joint", "joint"]
    apply_clear(model, ClearConfig(radius=1.5))
    clear = model_call(model, inputs)
    remove_clear(model)
    stock = model_call(model, inputs)
    with Masked(clear_mask(7 + registers, 3, 5, 1.5, text_first=True)):
        want = model_call(model, inputs)
    assert rel_err(clear, want) < 1e-5 and rel_err(stock, want) > 1e-4  # equal to the mask; the window masks
