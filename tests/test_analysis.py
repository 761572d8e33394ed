import json

import pytest
import torch

from clear_surgery.surgery import AnalysisReport, analyze, apply_clear, ClearConfig, load_builtin
from clear_surgery.surgery.core.families import EXAMPLE_GRID, EXAMPLE_TEXT_TOKENS


@pytest.mark.parametrize("name,joint,other,order", [
    ("tiny-flux", 4, 0, "text_first"),
    ("tiny-flux-schnell", 4, 0, "text_first"),
    ("tiny-sd3", 2, 0, "image_first"),
    ("tiny-sd35", 2, 1, "image_first"),  # dual-attention layer 0 adds an image-only attn2
    ("tiny-flux-controlnet", 2, 0, "text_first"),
    ("tiny-sd3-controlnet", 1, 0, "image_first"),
])
def test_sites_found(name, joint, other, order):
    model = load_builtin(name)
    report = analyze(model)
    cfg = model.config
    if "flux" in name:  # num_layers + num_single_layers joint sites
        assert joint == cfg.num_layers + cfg.num_single_layers
    else:
        assert joint == cfg.num_layers
    assert len(report.joint_sites) == joint
    assert len(report.sites) == joint + other
    image = EXAMPLE_GRID[0] * EXAMPLE_GRID[1]
    for site in report.joint_sites:
        assert site.order == order and site.supported and site.op == "sdpa"
        assert site.query_tokens == site.key_tokens == EXAMPLE_TEXT_TOKENS + image
        assert site.heads == cfg.num_attention_heads and site.head_dim == cfg.attention_head_dim
        # the site names the module that owns the call, and that module's stock processor
        stock = {"text_first": "FluxAttnProcessor", "image_first": "JointAttnProcessor2_0"}[order]
        assert site.processor == type(model.get_submodule(site.module).processor).__name__ == stock
    for site in report.sites:
        if site.kind != "joint":
            assert site.kind == "image" and not site.supported and "image-only" in site.reason


def test_sd3_last_block_context_pre_only_is_found():
    model = load_builtin("tiny-sd3")
    assert model.transformer_blocks[-1].context_pre_only
    modules = [s.module for s in analyze(model).joint_sites]
    assert modules[-1] == f"transformer_blocks.{len(model.transformer_blocks) - 1}.attn"


def test_report_json_round_trip_and_table():
    report = analyze(load_builtin("tiny-flux"))
    again = AnalysisReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    table = report.table()
    assert "single_transformer_blocks.1.attn" in table and "text_first" in table


def test_converted_model_traces_as_clear():
    model = load_builtin("tiny-sd3")
    apply_clear(model, ClearConfig(radius=3))
    report = analyze(model)
    assert [s.op for s in report.joint_sites] == ["clear", "clear"]
    assert all(s.order == "image_first" for s in report.joint_sites)


class SelfAttentionOnly(torch.nn.Module):
    """A DiT-like model without text: attention is image-only."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, hidden_states, encoder_hidden_states):
        q, k, v = self.proj(hidden_states).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        c = encoder_hidden_states.unflatten(-1, (2, 4)).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(x, c, c)


def test_model_without_joint_attention_says_what_was_found():
    model = SelfAttentionOnly()
    inputs = dict(hidden_states=torch.randn(1, 12, 8), encoder_hidden_states=torch.randn(1, 5, 8))
    report = analyze(model, inputs, text_tokens=5, image_tokens=12)
    assert [s.kind for s in report.sites] == ["image", "cross"]
    from clear_surgery.surgery import select_sites
    with pytest.raises(ValueError, match=r"no joint text-image attention.*2 attention sites \(1 cross, 1 image\)"):
        select_sites(report, ClearConfig(radius=2))


def test_unknown_model_family():
    with pytest.raises(ValueError, match="not a model family clear-surgery knows"):
        analyze(SelfAttentionOnly())


def test_the_trace_skips_stack_traces_and_restores_the_switch(monkeypatch):
    """Capturing each node's Python stack trace is a quarter of an analysis trace's time, and nothing reads it."""
    from torch.fx import config

    seen, export = [], torch.export.export

    def spy(*args, **kwargs):
        seen.append(config.do_not_emit_stack_traces)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", spy)
    analyze(load_builtin("tiny-flux"))
    assert seen == [True] and config.do_not_emit_stack_traces is False
