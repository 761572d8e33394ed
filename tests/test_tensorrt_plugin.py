"""The TensorRT plugin against TensorRT's own Python plugin package (tensorrt_standin.py): registration through
its validators (twice in one process), the parser's fields from a real exported node, autotune, and the AOT
implementation with symbolic shapes, called as TensorRT's parser and builder call them. The launch it
describes (grid, scalars, PTX) is compared with what the PyTorch backend launches, and the PTX is assembled
for sm_90a with exactly the parameters TensorRT passes."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from clear_surgery.plugins import schema, tensorrt_plugin
from tensorrt_standin import (Expr, build_as_tensorrt_would, constant, plugin_package_dir, symbol,
                              tensorrt_plugin_package)

pytestmark = pytest.mark.skipif(plugin_package_dir() is None, reason="tensorrt-cu13-bindings is not installed")
triton = pytest.importorskip("triton")



def _q_dims():
    """FLUX shapes: one sample, 512 text tokens + rows x cols image tokens, 24 heads of 128."""
    return [constant(1), Expr("SUM", constant(512), Expr("PROD", symbol("rows"), symbol("cols"))), constant(24),
            constant(128)]


def _node_attributes(text_first: int, radius: float = 16.0) -> dict:
    """A ClearAttention node's attributes as the ONNX export writes them (engine encoding) plus the namespace."""
    call = schema.bind((None, None, None), dict(text_len=512, text_first=bool(text_first), height=0, width=0,
                                                radius=radius, tile_h=8, tile_w=8))
    return {**schema.engine_attributes(call), "plugin_namespace": tensorrt_plugin.PLUGIN_NAMESPACE}


def _build(trt, trtp, text_first=1, sizes=({"rows": 256, "cols": 256}, {"rows": 512, "cols": 512})):
    tensorrt_plugin.register()
    creator = trt.get_plugin_registry().get_creator(tensorrt_plugin.PLUGIN_NAME, tensorrt_plugin.PLUGIN_VERSION,
                                                    tensorrt_plugin.PLUGIN_NAMESPACE)
    assert creator is not None
    q = _q_dims()
    dims = [q, q, q, [symbol("rows"), symbol("cols")]]
    return build_as_tensorrt_would(trt, creator, _node_attributes(text_first), dims, trt.bfloat16, list(sizes))


@pytest.mark.parametrize("text_first", [1, 0])
def test_the_plugin_builds_as_tensorrt_builds_it(text_first):
    from clear_surgery.plugins.triton_aot import TACTICS, launch_plan, spec_for

    with tensorrt_plugin_package() as (trt, trtp):
        built = _build(trt, trtp, text_first)
        tensorrt_plugin.register()  # a second engine in the same process: registering again is a no-op
        assert list(trtp._lib.QDP_REGISTRY) == [tensorrt_plugin.PLUGIN_ID]
    assert built["output_types"] == [trt.bfloat16]
    assert [d.evaluate({"rows": 4, "cols": 5}) for d in built["output_dims"][0]] == [1, 532, 24, 128]
    assert sorted(built["tactics"]) == list(range(1, len(TACTICS) + 1))  # 0 is TensorRT's "no tactic"
    for tactic, (name, ptx, evaluated) in built["tactics"].items():
        spec = spec_for(128, "bf16", 16.0, bool(text_first), None, (8, 8), tactic - 1)
        for (grid, block, shared, scalars), rows in zip(evaluated, (256, 512)):
            plan = launch_plan(512 + rows * rows, 24, 1, rows, rows, spec)
            assert (grid, block, scalars) == (plan.grid, plan.block, plan.scalars)
            assert shared <= 48 * 1024  # TensorRT's launch sets no larger dynamic shared-memory limit
        assert f".entry {name}(" in ptx and ".target sm_90a" in ptx


def test_every_combination_offers_every_tactic_in_both_dtypes():
    with tensorrt_plugin_package() as (trt, trtp):
        built = _build(trt, trtp)
    types = sorted({tuple(d.type.name for d in combo) for combo in built["combinations"]})
    assert types == [("BF16",) * 5, ("HALF",) * 5]


def test_the_ptx_takes_exactly_the_arguments_tensorrt_passes(tmp_path):
    """TensorRT's AOT launch passes the input tensors, the extra scalar arguments and the outputs, nothing
    else; assembled for sm_90a, the kernel declares exactly those (Triton's scratch pointers removed). It reads
    and writes the tensors 16 bytes at a time, as Triton's own launch of it does (compiled without the tensors'
    alignment it moved 2 bytes per instruction and ran 1.8x slower)."""
    from clear_surgery.plugins.triton_aot import SCALARS, TENSOR_INPUTS, TENSOR_OUTPUTS

    with tensorrt_plugin_package() as (trt, trtp):
        built = _build(trt, trtp, sizes=({"rows": 64, "cols": 64},))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    expected = len(TENSOR_INPUTS) + len(SCALARS) + len(TENSOR_OUTPUTS)
    for tactic, (name, ptx, evaluated) in built["tactics"].items():
        assert len(evaluated[0][3]) == len(SCALARS)
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx and "ld.global.b16" not in ptx, tactic
        (tmp_path / "k.ptx").write_text(ptx)
        done = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", str(tmp_path / "k.ptx"), "-o",
                               str(tmp_path / "k.cubin")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        elf = subprocess.run([str(tools / "cuobjdump"), "-elf", str(tmp_path / "k.cubin")], capture_output=True,
                             text=True).stdout
        assert elf.count("EIATTR_KPARAM_INFO") == expected, tactic


def test_fields_follow_the_op_schema_and_arrive_as_arrays():
    import inspect

    fields = list(inspect.signature(tensorrt_plugin.describe).parameters)[len(tensorrt_plugin.TENSOR_INPUTS):]
    assert fields == list(schema.ENGINE_ATTRIBUTES)
    values = tensorrt_plugin.field_values({"radius": np.array([16.0], np.float32), "text_first": np.array([1], np.int32),
                                           "scale": np.array([0.0], np.float32), "tile_h": np.array([8], np.int32),
                                           "tile_w": np.array([8], np.int32)})
    assert values == {"text_first": 1, "radius": 16.0, "scale": 0.0, "tile_h": 8, "tile_w": 8}
    assert all(type(v) in (int, float) for v in values.values())


def test_without_tensorrt_registering_says_what_is_missing():
    """The stand-in leaves nothing behind; with no TensorRT installed, register() says so in one error."""
    import importlib.util
    import sys

    with tensorrt_plugin_package():
        pass
    assert "tensorrt" not in sys.modules or hasattr(sys.modules["tensorrt"], "Builder")  # only a real TensorRT
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(RuntimeError, match="TensorRT is not installed"):
            tensorrt_plugin.register()
