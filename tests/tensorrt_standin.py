"""TensorRT's own Python plugin package (``tensorrt.plugin``, shipped pure-Python inside the
tensorrt-cu13-bindings wheel) loaded over a small stand-in for TensorRT's compiled bindings, and the calls
TensorRT's ONNX parser and builder make into a quick plugin, in their order.

The stand-in holds only what the plugin package touches: enums, plugin fields, the plugin registry, and a
symbolic shape-expression builder whose expressions can be evaluated at concrete sizes. What it cannot
show: the C++ builder timing the tactics, serializing the engine and its runtime launching the kernel
(the GPU test of test_tensorrt_plugin.py launches the same PTX with the same arguments through the driver).
"""

import contextlib
import enum
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def plugin_package_dir() -> Path | None:
    """tensorrt_bindings/plugin of the installed bindings wheel, found without importing the wheel (its
    __init__ loads libnvinfer, which cannot be installed here)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "plugin"
    return folder if (folder / "_lib.py").is_file() else None


OPERATIONS = {"SUM": lambda a, b: a + b, "PROD": lambda a, b: a * b, "MAX": max, "MIN": min,
              "SUB": lambda a, b: a - b, "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b),
              "FLOOR_DIV": lambda a, b: a // b, "CEIL_DIV": lambda a, b: -(-a // b)}


class Expr:
    """A dimension expression (``trt.IDimensionExpr``): a constant, a named size, or an operation."""

    def __init__(self, op, *args):
        self.op, self.args = op, args

    def is_constant(self) -> bool:
        return self.op == "const" or (self.op not in ("sym",) and all(a.is_constant() for a in self.args))

    def get_constant_value(self) -> int:
        return self.evaluate({})

    def evaluate(self, sizes: dict) -> int:
        if self.op == "const":
            return self.args[0]
        if self.op == "sym":
            return sizes[self.args[0]]
        a, b = (x.evaluate(sizes) for x in self.args)
        return OPERATIONS[self.op](a, b)


class ExprBuilder:  # trt.IExprBuilder
    def constant(self, value):
        return Expr("const", int(value))

    def operation(self, op, a, b):
        return Expr(op.name, a, b)


def symbol(name):
    return Expr("sym", name)


def constant(value):
    return Expr("const", value)


class PluginTensorDesc:
    def __init__(self, dims=(), type=None, format=None, scale=1.0):
        self.dims, self.type, self.format, self.scale = tuple(dims), type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc, min=(), opt=(), max=()):
        self.desc, self.min, self.opt, self.max = desc, tuple(min), tuple(opt), tuple(max)


class PluginField:
    def __init__(self, name="", data=None, type=None):
        self.name, self.data, self.type = name, data, type


class Registry:
    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


class LaunchParams:  # the C++ side's launch parameters, set from the plugin's expressions
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class SymExprSetter:
    def __init__(self):
        self.nbSymExprs, self.exprs = 0, {}

    def __setitem__(self, index, value):
        self.exprs[index] = value


def _base(name):
    return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


def standin_module() -> types.ModuleType:
    """A module named ``tensorrt`` with what ``tensorrt.plugin`` reads of the compiled bindings."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, *a: None, "log": lambda self, *a: None})
    trt.DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4")
    trt.float32, trt.float16, trt.bfloat16, trt.int32 = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16,
                                                         trt.DataType.INT32)
    trt.nptype = lambda dtype: {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}[dtype]
    trt.TensorFormat = enum.Enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR")
    trt.PluginFieldType = enum.Enum("PluginFieldType",
                                    "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 INT64 FP8")
    trt.PluginArgType = enum.Enum("PluginArgType", "INT")
    trt.PluginArgDataType = enum.Enum("PluginArgDataType", "INT8 INT16 INT32")
    trt.DimensionOperation = enum.Enum("DimensionOperation",
                                       "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
    trt.TensorRTPhase = enum.Enum("TensorRTPhase", "BUILD RUNTIME")
    trt.QuickPluginCreationRequest = enum.Enum("QuickPluginCreationRequest",
                                               "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT")
    trt.Dims = type("Dims", (tuple,), {"MAX_DIMS": 8, "__new__": lambda cls, d=(): tuple.__new__(
        cls, () if isinstance(d, int) else d)})
    trt.DimsExprs = lambda n: [None] * n
    trt.IDimensionExpr, trt.IExprBuilder = Expr, ExprBuilder
    trt.PluginField, trt.PluginFieldCollection = PluginField, list
    trt.PluginTensorDesc, trt.DynamicPluginTensorDesc = PluginTensorDesc, DynamicPluginTensorDesc
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):
        setattr(trt, name, _base(name))
    registry = Registry()
    trt.get_plugin_registry = lambda: registry
    return trt


@contextlib.contextmanager
def tensorrt_plugin_package():
    """``tensorrt`` (the stand-in) and the real ``tensorrt.plugin`` in sys.modules inside the block."""
    folder = plugin_package_dir()
    if folder is None:
        raise ModuleNotFoundError("the tensorrt-cu13-bindings wheel (TensorRT's Python plugin package) is not installed")
    saved = {name: module for name, module in sys.modules.items() if name == "tensorrt" or name.startswith("tensorrt.")}
    for name in saved:
        del sys.modules[name]
    trt = standin_module()
    sys.modules["tensorrt"] = trt
    try:
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt.plugin"] = trt.plugin = package
        spec.loader.exec_module(package)
        yield trt, package
    finally:
        for name in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def parser_fields(creator, attributes: dict) -> list:
    """What TensorRT's ONNX parser hands a plugin creator for a node (onnx-tensorrt's loadFields): for each
    of the creator's field names, in that order, the node attribute of that name as a one-element array
    (INT: int32, FLOAT: float32); attributes the creator does not name (plugin_namespace) are not passed."""
    fields = []
    for declared in creator.field_names:
        value = attributes[declared.name]
        if isinstance(value, float):
            fields.append(PluginField(declared.name, np.array([value], np.float32), "FLOAT32"))
        else:
            fields.append(PluginField(declared.name, np.array([value], np.int32), "INT32"))
    return fields


def build_as_tensorrt_would(trt, creator, attributes: dict, input_dims: list, input_dtype, sizes_at: list):
    """The builder's calls into an AOT quick plugin for one node, in TensorRT's order: create (AOT), output
    types and shapes, format combinations (autotune), then for every tactic of the chosen combination its
    launch parameters and kernel. ``input_dims``: per input, its dimension expressions; ``sizes_at``:
    concrete sizes (symbol -> int) to evaluate the launch at. Returns, per tactic, the kernel name, PTX and
    the evaluated (grid, block, shared memory, extra scalar arguments) at each of ``sizes_at``."""
    plugin = creator.create_plugin(creator.name, creator.plugin_namespace,
                                   trt.PluginFieldCollection(parser_fields(creator, attributes)),
                                   trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT)
    count = len(input_dims)
    plugin.get_capability_interface(None)
    out_types = plugin.get_output_data_types([input_dtype] * count, [len(d) for d in input_dims])
    builder = ExprBuilder()
    out_dims = plugin.get_output_shapes(input_dims, [], builder)
    sizes = sizes_at[0]

    def concrete(dims):
        return tuple(d.evaluate(sizes) for d in dims)

    descs = [DynamicPluginTensorDesc(PluginTensorDesc(concrete(d), input_dtype, trt.TensorFormat.LINEAR))
             for d in input_dims]
    descs += [DynamicPluginTensorDesc(PluginTensorDesc(concrete(d), t, trt.TensorFormat.LINEAR))
              for d, t in zip(out_dims, out_types)]
    offered = plugin.get_supported_format_combinations(descs, count)
    width = len(descs)
    combos = [offered[i:i + width] for i in range(0, len(offered), width)]
    chosen = next(c for c in combos if all(d.type == input_dtype for d in c))
    plugin.configure_plugin(descs[:count], descs[count:])  # the combination whose types match the inputs
    results = {}
    for tactic in plugin.get_valid_tactics():
        plugin.set_tactic(tactic)
        launch, setter = LaunchParams(), SymExprSetter()
        plugin.get_launch_params(input_dims, descs, count, launch, setter, builder)
        name, ptx = plugin.get_kernel([d.desc for d in descs[:count]], [d.desc for d in descs[count:]])
        evaluated = []
        for at in sizes_at:
            grid = tuple(getattr(launch, f"grid_{a}").expr.evaluate(at) for a in "xyz")
            block = tuple(getattr(launch, f"block_{a}").expr.evaluate(at) for a in "xyz")
            scalars = tuple(setter.exprs[i].expr.evaluate(at) for i in range(setter.nbSymExprs))
            evaluated.append((grid, block, launch.shared_mem.expr.evaluate(at), scalars))
        results[tactic] = (name, ptx.decode() if isinstance(ptx, bytes) else ptx, evaluated)
    return {"output_types": out_types, "output_dims": out_dims, "combinations": combos, "chosen": chosen,
            "tactics": results}
