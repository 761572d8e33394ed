import pytest
import torch

from clear_surgery.surgery import (ClearConfig, RewriteError, analyze, apply_clear, example_inputs, get_clear_state,
                                   image_grid, load_builtin, remove_clear, tiny_pipeline)
from clear_surgery.surgery.core.families.flux import ClearFluxAttnProcessor
from conftest import LOADED_TOLERANCE, model_call, rel_err

ALL = ["tiny-flux", "tiny-flux-schnell", "tiny-sd3", "tiny-sd35", "tiny-flux-controlnet", "tiny-sd3-controlnet"]


@pytest.mark.parametrize("name", ALL)
def test_large_radius_equals_original_small_radius_differs(name):
    model = load_builtin(name)
    inputs = example_inputs(model, text_len=6, grid=(5, 7), batch=2)
    dense = model_call(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_clear(model, ClearConfig(radius=100))
    assert model.state_dict().keys() == state.keys()
    assert rel_err(model_call(model, inputs), dense) < 1e-6
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=1.5))
    assert rel_err(model_call(model, inputs), dense) > 1e-3
    remove_clear(model)
    assert torch.equal(model_call(model, inputs), dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_one_converted_model_runs_at_any_resolution():
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2))
    for grid in [(3, 5), (8, 4), (1, 9)]:
        inputs = example_inputs(model, text_len=4, grid=grid)
        out = model_call(model, inputs)
        assert out.shape[1] == grid[0] * grid[1]
        assert get_clear_state(model).runtime.grid == grid


def test_grid_from_call_matches_explicit_grid_and_transposed_grid_differs():
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2))
    inputs = example_inputs(model, text_len=4, grid=(4, 6))
    out = model_call(model, inputs)
    with image_grid(4, 6):
        assert torch.equal(model_call(model, inputs), out)
    with image_grid(6, 4):
        assert not torch.allclose(model_call(model, inputs), out)


def test_image_grid_that_does_not_match_tokens():
    model = load_builtin("tiny-sd3")
    apply_clear(model, ClearConfig(radius=2))
    inputs = example_inputs(model, text_len=4, grid=(4, 6))
    with image_grid(5, 5), pytest.raises(ValueError, match="image grid 5x5 = 25 tokens does not match"):
        model_call(model, inputs)


def test_non_raster_img_ids_are_refused():
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2))
    inputs = example_inputs(model, text_len=4, grid=(4, 6))
    inputs["img_ids"] = inputs["img_ids"].flip(0)
    with pytest.raises(ValueError, match="not a raster grid"):
        model_call(model, inputs)


def test_config_validates_itself():
    with pytest.raises(ValueError, match="radius must be > 0"):
        ClearConfig(radius=0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        ClearConfig(radius=-3)
    with pytest.raises(ValueError, match="radius must be a number"):
        ClearConfig(radius="8")
    with pytest.raises(ValueError, match="unknown backend"):  # a run-time choice, checked where it is made
        apply_clear(load_builtin("tiny-flux"), ClearConfig(radius=8), backend="cudnn")
    with pytest.raises(ValueError, match="unknown ClearConfig keys"):
        ClearConfig.from_dict({"radius": 8, "window": 3})
    assert ClearConfig.from_dict(ClearConfig(radius=8).to_dict()) == ClearConfig(radius=8)


def test_targets_are_validated_before_any_change():
    model = load_builtin("tiny-flux")
    before = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match="'nothing.*' matches no attention module"):
        apply_clear(model, ClearConfig(radius=2, target_modules=["transformer_blocks.*", "nothing.*"]))
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == before
    assert get_clear_state(model) is None


def test_target_and_exclude_patterns():
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2, exclude_modules=["single_transformer_blocks.*"]))
    converted = {s.module for s in analyze(model).sites if s.op == "clear"}
    assert converted == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}


def test_unsupported_site_is_reported_not_skipped():
    model = load_builtin("tiny-sd35")
    with pytest.raises(ValueError, match="transformer_blocks.0.attn2: image-only"):
        apply_clear(model, ClearConfig(radius=2, target_modules=["*"]))


def test_processor_without_dedicated_version_takes_the_generic_route():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from clear_surgery.surgery.core.processors import ClearSDPAProcessor

    class CustomProcessor(JointAttnProcessor2_0):  # a subclass may change the math: not the dedicated one
        pass

    inputs = example_inputs(load_builtin("tiny-sd35"), grid=(4, 5))
    reference = load_builtin("tiny-sd35")
    apply_clear(reference, ClearConfig(radius=1.5))
    model = load_builtin("tiny-sd35")
    model.transformer_blocks[1].attn.set_processor(CustomProcessor())
    assert analyze(model).site("transformer_blocks.1.attn").supported
    apply_clear(model, ClearConfig(radius=1.5))
    assert isinstance(model.transformer_blocks[1].attn.processor, ClearSDPAProcessor)
    assert torch.equal(model_call(model, inputs), model_call(reference, inputs))
    remove_clear(model)
    assert type(model.transformer_blocks[1].attn.processor) is CustomProcessor


def test_generic_route_is_undone_when_the_retrace_finds_other_changes(monkeypatch):
    from clear_surgery.surgery.core.processors import ClearSDPAProcessor

    model = load_builtin("tiny-flux")
    monkeypatch.setattr("clear_surgery.surgery.core.rewrite.clear_processor_for", lambda family, processor: None)
    original = ClearSDPAProcessor._attend
    monkeypatch.setattr(ClearSDPAProcessor, "_attend", lambda self, q, *a, **k: original(self, q * 1.0001, *a, **k))
    with pytest.raises(RewriteError, match="compute ops besides attention changed"):
        apply_clear(model, ClearConfig(radius=2))
    assert get_clear_state(model) is None
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"


def test_verification_catches_a_changed_graph(monkeypatch):
    model = load_builtin("tiny-flux")

    original = ClearFluxAttnProcessor.__call__

    def sloppy(self, attn, hidden_states, *args, **kwargs):  # adds an op besides attention
        return original(self, attn, hidden_states * 1.0001, *args, **kwargs)

    monkeypatch.setattr(ClearFluxAttnProcessor, "__call__", sloppy)
    from clear_surgery.surgery import RewriteError
    with pytest.raises(RewriteError, match="compute ops besides attention changed"):
        apply_clear(model, ClearConfig(radius=2))
    assert get_clear_state(model) is None  # undone


def test_double_apply_and_remove_without_apply():
    model = load_builtin("tiny-sd3")
    with pytest.raises(ValueError, match="no CLEAR attention to remove"):
        remove_clear(model)
    apply_clear(model, ClearConfig(radius=2), verify=False)
    with pytest.raises(ValueError, match="already has CLEAR attention"):
        apply_clear(model, ClearConfig(radius=2))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-flux-controlnet"])
def test_converted_models_run_in_stock_pipelines(name):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of a cat", height=32, width=48, num_inference_steps=2, output_type="pt")
    if "controlnet" in name:
        kwargs["control_image"] = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    if "flux" in name:
        kwargs["max_sequence_length"] = 16
    dense = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    models = [pipe.transformer] + ([pipe.controlnet] if "controlnet" in name else [])
    for model in models:
        apply_clear(model, ClearConfig(radius=100))
    same = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    for model in models:
        remove_clear(model)
        apply_clear(model, ClearConfig(radius=1.5))
    local = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert dense.shape == (1, 3, 32, 48)
    assert rel_err(same, dense) < 1e-5
    assert rel_err(local, dense) > 1e-4


def test_per_layer_radius_converts_saves_loads_and_runs(tmp_path):
    from clear_surgery.hub import load_converted, save_converted

    model = load_builtin("tiny-flux")
    inputs = example_inputs(model, text_len=5, grid=(5, 6))
    apply_clear(model, ClearConfig(radius=1.5))
    small = model_call(model, inputs)
    remove_clear(model)
    config = ClearConfig(radius=1.5, radius_overrides={"transformer_blocks.*": 100, "single_transformer_blocks.1.*": 3})
    apply_clear(model, config)
    radii = {n: m.processor.radius for n, m in model.named_modules() if hasattr(m, "processor")}
    assert radii == {"transformer_blocks.0.attn": 100, "transformer_blocks.1.attn": 100,
                     "single_transformer_blocks.0.attn": 1.5, "single_transformer_blocks.1.attn": 3}
    mixed = model_call(model, inputs)
    assert rel_err(mixed, small) > 1e-3
    save_converted(model, tmp_path / "mixed")
    loaded = load_converted(tmp_path / "mixed")
    assert get_clear_state(loaded).config == config
    assert rel_err(model_call(loaded, inputs), mixed) < LOADED_TOLERANCE


def test_per_layer_radius_rules_are_validated():
    model = load_builtin("tiny-flux")
    with pytest.raises(ValueError, match="radius_overrides / --radius-for pattern 'blocks.9.*' matches no converted attention module"):
        apply_clear(model, ClearConfig(radius=2, radius_overrides={"blocks.9.*": 4}))
    assert get_clear_state(model) is None
    with pytest.raises(ValueError, match="radius for 'transformer_blocks.0.attn' must be > 0"):
        ClearConfig(radius=2, radius_overrides={"transformer_blocks.0.attn": 0})
