"""TensorRT plugin for ``ClearAttention`` nodes: a thin adapter (TensorRT's quickly deployable plugins,
``tensorrt.plugin``) over ``triton_aot``, which does the work without TensorRT.

The plugin is ``clear::ClearAttention``: the ONNX node's op type is ``ClearAttention`` and its
``plugin_namespace`` attribute is ``clear`` (TensorRT's ONNX parser matches plugins by op type and that
attribute, not by the node's domain). Its inputs are q, k, v (batch, tokens, heads, head_dim) and a grid
carrier whose shape is the image grid (rows, cols); its fields are the node's attributes, taken from
the signature of ``describe`` (a test checks that the ONNX exporter writes exactly these). Only an AOT
implementation is registered: the engine embeds the kernel's PTX with the launch grid and scalar
arguments as expressions of the input shapes, and runs in TensorRT's C++ runtime without Python.

TensorRT cannot be installed on the machines this was written on: ``describe``, ``tactics`` and
``aot_launch`` (the plain functions below) are tested; the ``tensorrt.plugin`` registration is not.
"""

from __future__ import annotations

from typing import NamedTuple

PLUGIN_NAMESPACE = "clear"
PLUGIN_NAME = "ClearAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
TENSOR_INPUTS = ("q", "k", "v", "grid")
DTYPES = ("bf16", "fp16")


def describe(q, k, v, grid, radius: float, text_first: int, tile_h: int, tile_w: int, scale: float):
    """Shape and type inference: one output shaped and typed like q. The keyword fields are the
    plugin's (and the ONNX node's) attributes; ``scale`` 0 means 1 / sqrt(head_dim)."""
    return q.like()


class Combination(NamedTuple):
    types: str  # one type per input and output, TensorRT's "BF16, BF16, ..." form
    tactics: tuple[int, ...]  # indices into triton_aot.TACTICS


def tactics() -> list[Combination]:
    """What TensorRT may time: every input and the output in bf16, or in fp16, each with every config."""
    from .triton_aot import TACTICS

    count = len(TENSOR_INPUTS) + 1
    return [Combination(", ".join([dtype.upper()] * count), tuple(range(len(TACTICS)))) for dtype in DTYPES]


def aot_launch(q_shape, grid_shape, dtype: str, radius: float, text_first: int, tile_h: int, tile_w: int,
               scale: float, tactic: int = 0, arch: int = 90):
    """What the AOT implementation hands TensorRT, from the input shapes (integers or TensorRT's symbolic
    shape expressions): (kernel name, PTX, launch plan, shared memory bytes)."""
    from .triton_aot import aot_kernel, launch_plan, spec_for

    batch, tokens, heads, head_dim = q_shape
    height, width = grid_shape
    # head_dim is fixed by the weights: a concrete value wherever TensorRT builds
    spec = spec_for(int(head_dim), dtype, radius, bool(text_first), scale or None, (tile_h, tile_w), tactic)
    kernel = aot_kernel(spec, arch)
    return kernel.name, kernel.ptx, launch_plan(tokens, heads, batch, height, width, spec), kernel.shared_memory


def register() -> None:
    """Register the plugin with TensorRT's Python plugin registry (needs ``tensorrt`` >= 10.10)."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise RuntimeError(f"TensorRT is not installed ({err}): the {PLUGIN_ID} plugin needs tensorrt >= 10.10") from err
    if PLUGIN_ID in getattr(trtp, "QDP_REGISTRY", {}):
        return
    from typing import Tuple, Union

    dtype_names = {trt.bfloat16: "bf16", trt.float16: "fp16"}

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, grid: trtp.TensorDesc, radius: float,
                  text_first: int, tile_h: int, tile_w: int, scale: float) -> Tuple[trtp.TensorDesc]:
        return (describe(q, k, v, grid, radius, text_first, tile_h, tile_w, scale),)

    @trtp.autotune(PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, grid: trtp.TensorDesc, radius: float,
                  text_first: int, tile_h: int, tile_w: int, scale: float,
                  outputs: Tuple[trtp.TensorDesc]) -> list:
        found = []
        for combination in tactics():
            tuned = trtp.AutoTuneCombination(combination.types, "LINEAR")
            tuned.tactics(list(combination.tactics))
            found.append(tuned)
        return found

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, grid: trtp.TensorDesc, radius: float,
             text_first: int, tile_h: int, tile_w: int, scale: float, outputs: Tuple[trtp.TensorDesc],
             tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        q_shape = tuple(q.shape_expr[i] for i in range(4))
        q_shape = (*q_shape[:3], q.shape_expr[3].constant_value())  # head_dim: a compile-time constant
        name, ptx, plan, shared = aot_launch(q_shape, (grid.shape_expr[0], grid.shape_expr[1]),
                                             dtype_names[q.dtype], radius, text_first, tile_h, tile_w, scale,
                                             tactic or 0)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
        launch.block_x, launch.block_y, launch.block_z = plan.block
        launch.shared_mem = shared
        scalars = trtp.SymIntExprs(len(plan.scalars))
        for i, value in enumerate(plan.scalars):
            scalars[i] = trtp.SymInt32(value)
        return name, ptx, launch, scalars
