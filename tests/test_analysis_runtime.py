"""Run-time analysis: for models torch.export cannot trace, the attention sites come from the SDPA
calls of one eager forward. It must agree with the traced analysis wherever both can run."""

import warnings

import pytest

import clear_surgery.surgery.core.analysis as analysis
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, load_builtin, remove_clear
from clear_surgery.surgery.core.processors import AttentionCall
from clear_surgery.surgery.core.rewrite import RewriteError
from clear_surgery.surgery import build_tiny_model
from clear_surgery.surgery.tools.coverage import GRID, T

# joint text-first and image-first, dual attention, ControlNets, masked and packed sequences, cross attention
COMPARED = ["FLUX.1 (FluxTransformer2DModel)", "FLUX.1 ControlNet (FluxControlNetModel)",
            "SD3.5 (SD3Transformer2DModel, dual attention)", "QwenImage (QwenImageTransformer2DModel)",
            "HiDream (HiDreamImageTransformer2DModel, no routed experts)", "CogView4 (CogView4Transformer2DModel)",
            "AuraFlow (AuraFlowTransformer2DModel)", "Sana (SanaTransformer2DModel)"]


def _build(label):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, inputs, *tokens = build_tiny_model(label)
    text, image = (*tokens, T, GRID[0] * GRID[1])[:2]
    return model.eval(), inputs, text, image


def _analyze(label):
    model, inputs, text, image = _build(label)
    return analysis.analyze(model) if inputs is None else analysis.analyze(model, inputs, text_tokens=text,
                                                                           image_tokens=image)


def _facts(report):
    return [(s.module, s.kind, s.order, s.query_tokens, s.key_tokens, s.heads, s.head_dim, s.supported, s.reason)
            for s in report.sites]


def _no_export(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("torch.export switched off by the test")

    monkeypatch.setattr(analysis, "_export_quietly", fail)


@pytest.mark.parametrize("label", COMPARED)
def test_run_time_analysis_equals_the_traced_one(label, monkeypatch):
    traced = _analyze(label)
    assert traced.method == "torch.export" and traced.sites
    _no_export(monkeypatch)
    watched = _analyze(label)  # a fresh model: a finished export may leave caches behind
    assert watched.method == "run time (torch.export: RuntimeError)"
    assert _facts(watched) == _facts(traced)


@pytest.mark.parametrize("label,expected", [
    ("Lumina2 (Lumina2Transformer2DModel)", {"text", "image", "joint"}),
    ("QwenImage 2.1 (QwenImage21Transformer2DModel)", {"text", "cross"}),
])
def test_untraceable_models_are_analyzed_at_run_time(label, expected):
    report = _analyze(label)
    assert report.method.startswith("run time (torch.export: ")
    assert {s.kind for s in report.sites} == expected and "analyzed at run time" in report.table()
    with pytest.raises(Exception):
        analysis.analyze(*_build(label)[:2], text_tokens=T, image_tokens=GRID[0] * GRID[1], run_time_fallback=False)


def test_a_run_time_analysis_verifies_a_rewrite_by_its_outputs(monkeypatch):
    """Without a graph, the rewrite is checked by the example call: at a radius covering its grid CLEAR must equal
    the dense model. A CLEAR that does not (its output scaled by 1.01) is refused and undone."""
    model = load_builtin("tiny-flux")
    _no_export(monkeypatch)
    report = apply_clear(model, ClearConfig(radius=4))
    assert report.method.startswith("run time") and get_clear_state(model) is not None
    remove_clear(model)
    run = AttentionCall.run
    monkeypatch.setattr(AttentionCall, "run", lambda call: run(call) * 1.01)
    with pytest.raises(RewriteError, match="covering the example grid"):
        apply_clear(model, ClearConfig(radius=4))
    assert get_clear_state(model) is None  # undone
