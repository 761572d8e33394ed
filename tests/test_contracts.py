"""The contracts between modules: one op schema that the op, the ONNX node, the TensorRT plugin and the
AOT op derive from; saved settings apart from run-time choices."""

import json
import warnings

import pytest
import torch

from clear_surgery.export import export_model
from clear_surgery.hub import load_converted, save_converted
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, load_builtin

SIZES = {"min": "32x32", "opt": "48x64", "max": "128x128"}


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
