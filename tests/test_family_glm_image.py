"""GLM-Image converts through the generic route: its one joint SDPA call becomes clear::attention."""

import pytest
import torch

from clear_surgery.hub import load_converted, save_converted
from clear_surgery.surgery import ClearConfig, ClearSDPAProcessor, analyze, apply_clear, example_inputs, remove_clear
from conftest import LOADED_TOLERANCE, rel_err


def tiny_glm_image():
    from diffusers import GlmImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                          time_embed_dim=16, condition_dim=8,
                                          prior_vq_quantizer_codebook_size=32).eval()


def out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_analysis_finds_the_joint_sites():
    report = analyze(tiny_glm_image())
    assert [(s.kind, s.order, s.supported) for s in report.sites] == [("joint", "text_first", True)] * 2


def test_converts_masks_and_covers():
    model = tiny_glm_image()
    inputs = example_inputs(model, text_len=5, grid=(6, 5), batch=2)
    dense = out(model, inputs)
    apply_clear(model, ClearConfig(radius=1.5))  # the rewrite's re-trace check runs inside
    assert isinstance(model.transformer_blocks[0].attn1.processor, ClearSDPAProcessor)
    local = out(model, inputs)
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=100))
    wide = out(model, inputs)
    remove_clear(model)
    assert rel_err(wide, dense) < 1e-5 and rel_err(local, dense) > 1e-3
    assert torch.equal(out(model, inputs), dense)
    with pytest.raises(ValueError, match="token_layout='tiled' is not available"):
        apply_clear(model, ClearConfig(radius=2, token_layout="tiled"))


def test_saves_and_loads(tmp_path):
    model = tiny_glm_image()
    inputs = example_inputs(model, grid=(4, 6))
    apply_clear(model, ClearConfig(radius=2))
    save_converted(model, tmp_path / "glm-clear")
    assert rel_err(out(load_converted(tmp_path / "glm-clear"), inputs), out(model, inputs)) < LOADED_TOLERANCE
