"""The contracts between modules: one op schema that the op, the ONNX node, the TensorRT plugin and the
AOT op derive from; saved settings apart from run-time choices."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from clear_surgery.export import export_model
from clear_surgery.hub import load_converted, save_converted
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, load_builtin

SIZES = {"min": "32x32", "opt": "48x64", "max": "128x128"}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-flux-r2.toml"


def test_the_op_and_every_engine_form_derive_from_the_schema():
    import inspect

    from clear_surgery.export.onnx import ATTRIBUTES
    from clear_surgery.plugins import schema, tensorrt_plugin

    assert str(torch.ops.clear.attention.default._schema) == "clear::attention" + schema.torch_schema()
    assert str(torch.ops.clear.attention_aot.default._schema) == "clear::attention_aot" + schema.aot_schema()
    fields = list(inspect.signature(tensorrt_plugin.describe).parameters)[len(tensorrt_plugin.TENSOR_INPUTS):]
    assert ATTRIBUTES == schema.ENGINE_ATTRIBUTES and fields == list(schema.ENGINE_ATTRIBUTES)
    call = schema.bind((None, None, None), dict(text_len=3, text_first=True, height=2, width=2, radius=1.5))
    assert schema.engine_refusals(call) == []
    assert [line.split(":")[0] for line in schema.engine_refusals({**call, "pool_weight": 1, "images": [2, 2]})] == \
        ["pool_weight", "images"]


def test_export_of_the_down_variant_is_one_clear_refusal(tmp_path):
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2.5, down_factor=2))
    save_converted(model, tmp_path / "down", base_model={"id": "builtin:tiny-flux"})
    with pytest.raises(ValueError, match="pool_weight"):
        export_model(str(tmp_path / "down"), tmp_path / "onnx", "onnx", sizes=SIZES, text_len=7)
    assert not (tmp_path / "onnx").exists() and [p.name for p in tmp_path.iterdir()] == ["down"]


def test_a_folder_saved_with_a_backend_this_machine_lacks_still_loads(tmp_path):
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2.5))
    folder = save_converted(model, tmp_path / "saved", base_model={"id": "builtin:tiny-flux"})
    meta = json.loads((folder / "clear_config.json").read_text())
    meta["config"]["backend"] = "some-gpu-kernel"  # as written on a machine that had it (format of old folders)
    meta["config"]["version"] = 1
    (folder / "clear_config.json").write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_converted(folder)
    state = get_clear_state(loaded)
    assert state.runtime.backend == "auto" and state.config.radius == 2.5
    assert [str(w.message) for w in caught if "some-gpu-kernel" in str(w.message)]


# --- the run-time route: tools add steps instead of setting flags ------------------------------------


def _tiny_inputs(model, seed=0):
    from clear_surgery.surgery import example_inputs

    torch.manual_seed(seed)
    return example_inputs(model)


def test_a_route_step_sees_every_call_and_can_change_it():
    from dataclasses import replace

    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=2.5))
    runtime = get_clear_state(model).runtime
    inputs = _tiny_inputs(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
        seen = []

        def record(call, proceed):
            seen.append((call.site, call.height, call.width, call.text_len))
            return proceed(call)

        with runtime.routed("record", record):
            assert torch.equal(model(**inputs)[0], plain)  # a step that hands the call on changes nothing
        assert [s[0] for s in seen] == get_clear_state(model).sites and not runtime.routes
        with runtime.routed("half-scale", lambda call, proceed: proceed(replace(call, scale=0.5 * call.query.shape[-1] ** -0.5))):
            assert not torch.allclose(model(**inputs)[0], plain)
        with runtime.routed("zero", lambda call, proceed: torch.zeros_like(call.query)), \
                runtime.routed("never", lambda call, proceed: pytest.fail("a step after an answering one ran")):
            model(**inputs)
        assert torch.equal(model(**inputs)[0], plain)
    with pytest.raises(ValueError, match="already"), runtime.routed("x", record), runtime.routed("x", record):
        pass


def test_observe_attention_leaves_the_model_dense_and_unconverted():
    from clear_surgery.surgery import observe_attention

    model = load_builtin("tiny-flux")
    processors = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    inputs = _tiny_inputs(model)
    calls = []

    def dense(call, proceed):
        calls.append(call.site)
        assert get_clear_state(model) is None  # observed, not converted
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (call.query, call.key,
                                                                                               call.value)))
        return out.transpose(1, 2)

    with torch.no_grad():
        before = model(**inputs)[0]
        with observe_attention(model, dense) as report:
            observed = model(**inputs)[0]
        after = model(**inputs)[0]
    assert calls == [s.module for s in report.joint_sites]
    torch.testing.assert_close(observed, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before) and get_clear_state(model) is None
    assert {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")} == processors


def test_tile_layout_and_patch_parallel_share_one_token_boundary():
    """Both enter and leave the model where the family's TilePlan says, through one set of hooks."""
    from clear_surgery.surgery.core.boundary import TokenBoundary
    from clear_surgery.surgery.core.patch_parallel import BandRuntime
    from clear_surgery.surgery.core.tiling import TileLayout

    assert issubclass(TileLayout, TokenBoundary) and issubclass(BandRuntime, TokenBoundary)
    model = load_builtin("tiny-flux")
    entered, left = [], []

    class Watch(TokenBoundary):
        def start(self, model):
            entered.clear()

        def enter(self, x):
            entered.append(tuple(x.shape) if isinstance(x, torch.Tensor) else x)
            return x

        def enter_ids(self, ids):
            entered.append(("ids", tuple(ids.shape)))
            return ids

        def leave(self, x):
            left.append(tuple(x.shape))
            return x

    from clear_surgery.surgery import family_of

    watch = Watch(model, family_of(model).tile_plan)
    inputs = _tiny_inputs(model)
    with torch.no_grad():
        model(**inputs)
    watch.remove()
    tokens = inputs["hidden_states"].shape[1]
    assert entered[0] == tuple(inputs["hidden_states"].shape) and ("ids", tuple(inputs["img_ids"].shape)) in entered
    assert left == [(1, tokens, inputs["hidden_states"].shape[2])]
    with torch.no_grad():
        model(**inputs)
    assert len(left) == 1  # removed: no hook left behind


# --- family facts live in the family modules -----------------------------------------------------------


def test_family_facts_come_from_the_registry():
    from clear_surgery.surgery import FAMILIES, build_tiny_model, family_for_class, is_controlnet, tiny_models
    from clear_surgery.surgery.tools.bench import FLUX_DEV

    rows = tiny_models()
    claimed = [row for family in FAMILIES for row in family.tiny_models]
    assert list(rows)[:len(claimed)] == claimed and len(rows) > len(claimed)  # the unconverted ones come last
    for family in FAMILIES:
        assert set(family.controlnets) <= set(family.class_names)
        for row in family.tiny_models:  # every row a family declares is a model of that family
            assert family_for_class(type(build_tiny_model(row)[0]).__name__) is family, row
    assert [c for f in FAMILIES for c in f.controlnets] == [c for f in FAMILIES for c in f.class_names
                                                             if "ControlNet" in c]
    assert is_controlnet("FluxControlNetModel") and not is_controlnet("FluxTransformer2DModel")
    assert not is_controlnet("SomeUnknownControlNetModel")  # unknown classes are not guessed from their name
    assert FLUX_DEV["num_single_layers"] == 38 and family_for_class("FluxTransformer2DModel").loss_stacks[0] == \
        "single_transformer_blocks"


# --- one validation style ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,message", [
    (True, "must be a number, got True"), ("3", "must be a number, got '3'"), (0, "must be > 0 and finite, got 0"),
    (float("inf"), "must be > 0 and finite, got inf"), (float("nan"), "must be > 0 and finite, got nan")])
def test_every_validator_says_a_bad_number_the_same_way(value, message):
    """The same fault in the config, the generate and transfer settings, a recipe and an option: one message form."""
    from clear_surgery.surgery.core.checks import check_number
    from clear_surgery.surgery.tools.distillation import load_recipe
    from clear_surgery.surgery.tools.generate import GenerateSettings
    from clear_surgery.surgery.tools.transfer import TransferSettings

    with pytest.raises(ValueError, match=f"^radius {message}"):
        ClearConfig(radius=value)
    with pytest.raises(ValueError, match=f"^ntk-factor {message}"):
        GenerateSettings("a cat", 64, 64, ntk_factor=value)
    with pytest.raises(ValueError, match=f"^--radius {message}"):
        check_number("--radius", value, low=0)
    toml = {True: "true", "3": '"3"'}.get(value, str(value))  # TOML writes 0, inf, nan as Python prints them
    with pytest.raises(ValueError, match=f"train.learning_rate {message}"):
        load_recipe(RECIPE, [f"train.learning_rate={toml}"])
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1, got 0"):
        TransferSettings(prompts=["a"], steps=0)
