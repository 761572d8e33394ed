"""The arguments of ``clear::attention``, written once.

The op's torch schema, the keyword front door's order, the ONNX node's attributes, the TensorRT
plugin's fields and the self-contained (AOT) op are all derived from ``ARGUMENTS``; what an engine
cannot serve is refused here, by argument name, with one error.

Every argument says how an engine (an ONNX ``ClearAttention`` node, the TensorRT plugin, an
AOTInductor package; all run the one self-contained kernel) receives it:

- ``input``: a tensor input of the node (q, k, v);
- ``grid``: the image grid, carried as the shape of the node's fourth input, so that one file serves
  every resolution;
- ``derived``: computed from other inputs (the text length is the token count minus rows x cols);
- ``attribute``: a node attribute and plugin field, with its ONNX type and its encoding of ``None``;
- ``run-time``: a choice of the running process, never part of an engine (the engine is its backend);
- ``absent``: the engines' kernel has no such input, so only the default can be exported.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # marks an argument without a default


@dataclass(frozen=True)
class Argument:
    name: str
    type: str  # the type in torch's schema language
    engine: str  # input | grid | derived | attribute | run-time | absent (module docstring)
    default: Any = REQUIRED
    onnx_type: str | None = None  # attributes: "FLOAT" or "INT"
    what: str = ""  # for messages: what a non-default value of an absent argument is

    def declaration(self) -> str:
        if self.default is REQUIRED:
            return f"{self.type} {self.name}"
        text = f'"{self.default}"' if isinstance(self.default, str) else str(self.default)
        return f"{self.type} {self.name}={text}"


ARGUMENTS: tuple[Argument, ...] = (
    Argument("q", "Tensor", "input"),
    Argument("k", "Tensor", "input"),
    Argument("v", "Tensor", "input"),
    Argument("text_len", "SymInt", "derived"),
    Argument("text_first", "bool", "attribute", onnx_type="INT"),
    Argument("height", "SymInt", "grid"),
    Argument("width", "SymInt", "grid"),
    Argument("radius", "float", "attribute", onnx_type="FLOAT"),
    Argument("scale", "float?", "attribute", None, onnx_type="FLOAT"),  # None (0 in engines): 1 / sqrt(head_dim)
    Argument("backend", "str", "run-time", "auto"),
    # FP8 (e4m3) attention where a backend declares it (gluon-fp8: image queries); never chosen unasked
    Argument("fp8", "bool", "run-time", False),
    Argument("tile_h", "SymInt", "attribute", 0, onnx_type="INT"),  # 0: raster order
    Argument("tile_w", "SymInt", "attribute", 0, onnx_type="INT"),
    Argument("pool_weight", "Tensor?", "absent", None, what="pooled keys (the 'down' variant)"),
    Argument("attn_mask", "Tensor?", "absent", None, what="an attention mask (text padding)"),
    Argument("images", "SymInt[]?", "absent", None, what="several images in one sequence"),
)
BY_NAME = {a.name: a for a in ARGUMENTS}
NAMES = tuple(BY_NAME)
TENSOR_INPUTS = tuple(a.name for a in ARGUMENTS if a.engine == "input")
# node attributes and plugin fields, in order, with their ONNX types
ENGINE_ATTRIBUTES = {a.name: a.onnx_type for a in ARGUMENTS if a.engine == "attribute"}
GRID = tuple(a.name for a in ARGUMENTS if a.engine == "grid")


def torch_schema() -> str:
    """The op's schema for ``torch.library`` (without the name)."""
    return "(" + ", ".join(a.declaration() for a in ARGUMENTS) + ") -> Tensor"


def bind(args: tuple, kwargs: dict | None = None) -> dict:
    """Positional and keyword arguments of a call, by name, with the defaults filled in."""
    kwargs = dict(kwargs or {})
    if len(args) > len(ARGUMENTS):
        raise TypeError(f"clear::attention takes {len(ARGUMENTS)} arguments, got {len(args)}")
    values = dict(zip(NAMES, args))
    for name, value in kwargs.items():
        if name not in BY_NAME or name in values:
            raise TypeError(f"clear::attention: unexpected or repeated argument {name!r}")
        values[name] = value
    for a in ARGUMENTS:
        if a.name not in values:
            if a.default is REQUIRED:
                raise TypeError(f"clear::attention: missing argument {a.name!r}")
            values[a.name] = a.default
    return values


def engine_refusals(values: dict) -> list[str]:
    """What in a call (arguments by name) the engines' kernel cannot run: one line per argument."""
    return [f"{a.name}: {a.what} (engines take only {a.name}={a.default})"
            for a in ARGUMENTS if a.engine == "absent" and values.get(a.name) not in (None, (), [])]


class EngineCallError(ValueError):
    """A call an engine cannot serve (raised while tracing; exporters unwrap it from their own errors)."""


def check_engine_call(values: dict, where: str = "an engine") -> None:
    """One EngineCallError naming every argument ``where`` cannot take."""
    problems = engine_refusals(values)
    if problems:
        raise EngineCallError(f"{where} cannot serve this CLEAR attention call: " + "; ".join(problems))


@contextlib.contextmanager
def engine_errors_unwrapped():
    """Inside: an EngineCallError that an exporter wrapped in errors of its own comes out as itself."""
    try:
        yield
    except Exception as err:
        cause = err
        while cause is not None and not isinstance(cause, EngineCallError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause is err:
            raise
        raise EngineCallError(str(cause)) from None


def engine_attributes(values: dict) -> dict:
    """The node attributes / plugin fields of a call, encoded as engines store them (bool as 0/1,
    ``None`` scale as 0.0)."""
    encoded = {}
    for name, kind in ENGINE_ATTRIBUTES.items():
        value = values[name]
        encoded[name] = float(value or 0.0) if kind == "FLOAT" else int(value or 0)
    return encoded


def engine_arguments(values: dict) -> list:
    """A call's arguments as the engines' kernel takes them: tensor inputs, the grid, the attributes encoded."""
    return [*(values[name] for name in TENSOR_INPUTS), *(values[name] for name in GRID),
            *engine_attributes(values).values()]


AOT_TYPES = {"FLOAT": "float", "INT": "SymInt"}


def aot_arguments() -> tuple[Argument, ...]:
    """The arguments of ``clear::attention_aot``, the engines' kernel as an op: ``engine_arguments`` in order
    (attributes in their engine encoding: 0 for a default scale, text_first as 0/1)."""
    return (*(BY_NAME[n] for n in (*TENSOR_INPUTS, *GRID)),
            *(Argument(n, AOT_TYPES[kind], "attribute", onnx_type=kind) for n, kind in ENGINE_ATTRIBUTES.items()))


def aot_schema() -> str:
    return "(" + ", ".join(a.declaration() for a in aot_arguments()) + ") -> Tensor"


_PYTHON_TYPES = {"Tensor": "torch.Tensor", "SymInt": int, "bool": bool, "float": float, "str": str, "SymInt[]": list[int]}


def signature(arguments: tuple[Argument, ...] = ARGUMENTS) -> inspect.Signature:
    """A Python signature for these arguments (names, annotations, defaults), for the functions that
    implement them: tools that read a function's signature (torch.library, the ONNX exporter) see the schema."""
    import torch

    def annotation(kind: str):
        plain = _PYTHON_TYPES[kind.rstrip("?")]
        plain = torch.Tensor if plain == "torch.Tensor" else plain
        return typing.Optional[plain] if kind.endswith("?") else plain

    return inspect.Signature([inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                annotation=annotation(a.type),
                                                default=inspect.Parameter.empty if a.default is REQUIRED else a.default)
                              for a in arguments], return_annotation=torch.Tensor)


def implements(arguments: tuple[Argument, ...] = ARGUMENTS):
    """Decorator: ``fn(*args)`` gets the signature of ``arguments``."""
    def decorate(fn):
        fn.__signature__ = signature(arguments)
        return fn
    return decorate
