"""TensorRT plugin for ``ClearAttention`` nodes: a thin adapter (TensorRT's quickly deployable plugins,
``tensorrt.plugin``) over ``triton_aot``, which does the work without TensorRT.

The plugin is ``clear::ClearAttention``: the ONNX node's op type is ``ClearAttention`` and its
``plugin_namespace`` attribute is ``clear`` (TensorRT's ONNX parser matches plugins by op type and that
attribute, not by the node's domain). Its inputs are q, k, v (batch, tokens, heads, head_dim) and a grid
carrier whose shape is the image grid (rows, cols); its fields are the op schema's engine attributes
(``schema.ENGINE_ATTRIBUTES``, the ONNX node's attributes), each received as the one-element array the
ONNX parser makes of an attribute (INT: int32, FLOAT: float32). Only an AOT implementation is
registered: the engine embeds the kernel's PTX with the launch grid and scalar arguments as expressions
of the input shapes, and runs in TensorRT's C++ runtime without Python.

No ``from __future__ import annotations`` in this module: TensorRT's validators read the functions'
annotations with ``inspect.signature`` and call ``issubclass`` on them, so they must be classes.
The registration is tested against TensorRT's own ``tensorrt.plugin`` package (over a stand-in for its
compiled bindings); only a machine with TensorRT can run the builder itself.
"""

import inspect
from typing import List, NamedTuple, Tuple, Union

import numpy as np
import numpy.typing as npt

from .schema import ENGINE_ATTRIBUTES
from .schema import TENSOR_INPUTS as OP_TENSOR_INPUTS

PLUGIN_NAMESPACE = "clear"
PLUGIN_NAME = "ClearAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
TENSOR_INPUTS = (*OP_TENSOR_INPUTS, "grid")
DTYPES = ("bf16", "fp16")
# Each field as the ONNX parser passes an attribute: a one-element array. Declared as arrays (not Python
# numbers) because creators before TensorRT 11 turn a number field into Python with int(array), which
# numpy >= 2.4 refuses for an array.
FIELD_DTYPES = {"FLOAT": np.float32, "INT": np.int32}
FIELDS = {name: FIELD_DTYPES[kind] for name, kind in ENGINE_ATTRIBUTES.items()}


def field_values(fields: dict) -> dict:
    """The fields as Python numbers (each one-element array's element 0; plain numbers pass through)."""
    def value(name, given):
        item = np.asarray(given).reshape(-1)[0]
        return float(item) if FIELDS[name] is np.float32 else int(item)

    return {name: value(name, fields[name]) for name in FIELDS}


class Combination(NamedTuple):
    types: str  # one type per input and output, TensorRT's "BF16, BF16, ..." form
    tactics: tuple[int, ...]  # tactic ids: 1 + an index into triton_aot.TACTICS (TensorRT reserves 0)


def tactics() -> list[Combination]:
    """What TensorRT may time: every input and the output in bf16, or in fp16, each with every config."""
    from .triton_aot import TACTICS

    count = len(TENSOR_INPUTS) + 1
    return [Combination(", ".join([dtype.upper()] * count), tuple(range(1, len(TACTICS) + 1))) for dtype in DTYPES]


def tactic_index(tactic: int | None) -> int:
    """The triton_aot.TACTICS entry of a tactic id (0 or None, no tactic chosen: the default, the first)."""
    from .triton_aot import TACTICS

    index = (tactic or 1) - 1
    if not 0 <= index < len(TACTICS):
        raise ValueError(f"unknown tactic {tactic}: the plugin advertises 1..{len(TACTICS)}")
    return index


def aot_launch(q_shape, grid_shape, dtype: str, fields: dict, tactic: int | None = None, arch: int = 90):
    """What the AOT implementation hands TensorRT, from the input shapes (integers or TensorRT's symbolic
    shape expressions) and the fields: (kernel name, PTX with exactly TensorRT's AOT parameters, launch plan,
    shared memory bytes)."""
    from .triton_aot import aot_kernel, engine_ptx, launch_plan, spec_for

    values = field_values(fields)
    batch, tokens, heads, head_dim = q_shape
    height, width = grid_shape
    # head_dim is fixed by the weights: a concrete value wherever TensorRT builds
    spec = spec_for(int(head_dim), dtype, values["radius"], bool(values["text_first"]), values["scale"] or None,
                    (values["tile_h"], values["tile_w"]), tactic_index(tactic))
    kernel = aot_kernel(spec, arch)
    return kernel.name, engine_ptx(kernel), launch_plan(tokens, heads, batch, height, width, spec), kernel.shared_memory


def _signature(fn, *, tensors=inspect.Parameter.empty, outputs=None, tactic=False,
               returns=inspect.Signature.empty):
    """``fn`` with the parameters TensorRT's validators expect: the tensor inputs, then every field (as
    numpy arrays of their dtype), then ``outputs`` and ``tactic`` where asked."""
    param = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, param, annotation=tensors) for name in TENSOR_INPUTS]
    params += [inspect.Parameter(name, param, annotation=npt.NDArray[dtype]) for name, dtype in FIELDS.items()]
    if outputs is not None:
        params.append(inspect.Parameter("outputs", param, annotation=outputs))
    if tactic:
        params.append(inspect.Parameter("tactic", param, annotation=int))
    fn.__signature__ = inspect.Signature(params, return_annotation=returns)
    return fn


def _registry(trtp) -> dict:
    """TensorRT's table of registered quick plugins (``tensorrt.plugin._lib.QDP_REGISTRY``)."""
    from importlib import import_module

    return getattr(import_module(f"{trtp.__name__}._lib"), "QDP_REGISTRY", {})


def register() -> None:
    """Register the plugin with TensorRT's Python plugin registry (tensorrt >= 10.10); once per process."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise RuntimeError(f"TensorRT is not installed ({err}): the {PLUGIN_ID} plugin needs tensorrt >= 10.10") from err
    if PLUGIN_ID in _registry(trtp):
        return
    dtype_names = {trt.bfloat16: "bf16", trt.float16: "fp16"}
    desc, outputs = trtp.TensorDesc, Tuple[trtp.TensorDesc]

    def autotune(*args, **fields):
        found = []
        for combination in tactics():
            tuned = trtp.AutoTuneCombination(combination.types, "LINEAR")
            tuned.tactics(list(combination.tactics))
            found.append(tuned)
        return found

    def aot_impl(q, k, v, grid, *args):
        *field_args, _, tactic = args  # TensorRT passes every field, in the order registered
        q_shape = (q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], q.shape_expr[3].constant_value())
        name, ptx, plan, shared = aot_launch(q_shape, (grid.shape_expr[0], grid.shape_expr[1]), dtype_names[q.dtype],
                                             dict(zip(FIELDS, field_args)), tactic)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
        launch.block_x, launch.block_y, launch.block_z = plan.block
        launch.shared_mem = shared
        scalars = trtp.SymIntExprs(len(plan.scalars))
        for i, value in enumerate(plan.scalars):
            scalars[i] = trtp.SymInt32(value)
        return name, ptx, launch, scalars

    trtp.register(PLUGIN_ID)(_signature(lambda *args, **fields: _describe(*args), tensors=desc, returns=outputs))
    trtp.autotune(PLUGIN_ID)(_signature(autotune, tensors=desc, outputs=outputs,
                                        returns=List[trtp.AutoTuneCombination]))
    trtp.aot_impl(PLUGIN_ID)(_signature(
        aot_impl, tensors=desc, outputs=outputs, tactic=True,
        returns=Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]))


def _describe(q, k, v, grid, **fields):
    """Shape and type inference: one output shaped and typed like q (TensorDesc.like)."""
    return q.like()


# with the registered parameters: the tensor inputs, then the fields (what the ONNX node's attributes must be)
describe = _signature(_describe)
