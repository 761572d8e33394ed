"""What every export format shares: the model (a converted CLEAR model, in any form the resolver
takes), its family's export plan, the size profile, dynamic shapes, and the manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clear_surgery.hub import load_model
from clear_surgery.hub.checkpoint import package_version
from clear_surgery.hub.resolve import ModelRef
from clear_surgery.plugins import schema
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, remove_clear
from clear_surgery.surgery.core.dtypes import DTYPES, parse_dtype  # noqa: F401 (DTYPES re-exported)
from clear_surgery.surgery.core.errors import InvalidValueError, MissingHardwareError

FORMATS = ("onnx", "tensorrt", "aoti")
# where an AOTInductor package's CLEAR attention runs: "embedded", the self-contained Triton kernel compiled into
# the package (it loads in any process with torch); "registered", a call of the ``clear::attention`` op, so the
# loading process imports clear_surgery first and runs its fastest backend (the Gluon kernel on Hopper)
AOTI_ATTENTION = ("embedded", "registered")
MANIFEST_FILE = "manifest.json"


class ExportError(InvalidValueError):
    pass


def check_options(fmt: str, sizes: dict, dtype: str | None, aoti_attention: str | None = None) -> None:
    """What can be checked without the model: the format and whether this machine can make it, the
    dtype, and the sizes' syntax and order (their multiple depends on the model: checked after loading).
    ``aoti_attention`` (None: the default, "embedded"): where a package's attention runs (``AOTI_ATTENTION``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if aoti_attention is not None and aoti_attention not in AOTI_ATTENTION:
        raise ExportError(f"--aoti-attention must be one of {', '.join(AOTI_ATTENTION)}, got {aoti_attention!r}")
    if aoti_attention is not None and fmt != "aoti":
        raise ExportError(f"--aoti-attention is an option of --format aoti, not of --format {fmt}")
    parse_dtype(dtype, "--dtype")
    parsed = {k: parse_size(v, f"--{k}-size") if isinstance(v, str) else tuple(v) for k, v in sizes.items()}
    for side, name in ((0, "height"), (1, "width")):
        values = [parsed[k][side] for k in ("min", "opt", "max") if k in parsed]
        if values != sorted(values) or min(values) < 1:
            raise ExportError(f"sizes outside the profile: {name} must satisfy 0 < min <= opt <= max, got "
                              + " / ".join(map(str, values)))
    if fmt == "tensorrt":
        from .tensorrt import tensorrt_version

        tensorrt_version()  # fails now, not after the export, when TensorRT is missing
    if fmt == "aoti" and aoti_attention in (None, "embedded") and not torch.cuda.is_available():
        raise MissingHardwareError("--format aoti compiles the CLEAR kernel for the GPU the package will run on: it "
                                   "needs a CUDA GPU (--aoti-attention registered also builds CPU packages)")


def parse_size(text: str, option: str) -> tuple[int, int]:
    """'1024x768' (height x width in pixels) or '1024' (square)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not match:
        raise ExportError(f"{option} takes HEIGHTxWIDTH in pixels (e.g. 1024x768), got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@dataclass
class SizeProfile:
    """Image sizes an export serves, in pixels: every size from min to max (per side), tuned for opt."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]
    pixels_per_token: int = 16

    def check(self) -> None:
        step = self.pixels_per_token
        for name, (h, w) in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if h % step or w % step or h < 2 * step or w < 2 * step:
                raise ExportError(f"--{name}-size {h}x{w}: each side must be a multiple of {step} pixels and at "
                                  f"least {2 * step} (two tokens)")
        for side, name in ((0, "height"), (1, "width")):
            if not self.min[side] <= self.opt[side] <= self.max[side]:
                raise ExportError(f"sizes outside the profile: {name} must satisfy min <= opt <= max, got "
                                  f"{self.min[side]} / {self.opt[side]} / {self.max[side]}")

    def grid(self, which: str) -> tuple[int, int]:
        h, w = getattr(self, which)
        return h // self.pixels_per_token, w // self.pixels_per_token

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max),
                "pixels_per_token": self.pixels_per_token}


@dataclass
class Prepared:
    """A CLEAR model ready to export, its family's plan and the example call."""

    model: torch.nn.Module
    ref: ModelRef | None  # None: a model handed over in memory
    plan: object  # ExportPlan
    wrapper: torch.nn.Module
    inputs: dict
    dynamic_shapes: dict
    sizes: SizeProfile
    dtype: torch.dtype
    text_len: int
    batch: int
    notes: list = field(default_factory=list)


def check_before_loading(source, sizes: dict) -> None:
    """What can be checked from a model's configs alone (``check_exportable``), so that a wrong size or an
    unconverted model fails before any weight is read."""
    if isinstance(source, torch.nn.Module):
        return
    from clear_surgery.hub import resolve_model

    ref = source if isinstance(source, ModelRef) else resolve_model(source)
    check_exportable(f"{ref.source} is {ref.describe()}", ref.model_class, ref.meta["config"] if ref.is_clear
                     else None, sizes)


def check_exportable(what: str, model_class: str, config: dict | None, sizes: dict) -> SizeProfile:
    """One error for a model an export cannot serve: not converted (``config`` None), a family without an
    export plan, a converted variant the engines' kernel cannot run (checked against the op schema before any
    tracing; the ONNX translation refuses any other call), sizes off the family's token step."""
    from clear_surgery.surgery import family_for_class

    if config is None:
        raise ExportError(f"{what} without CLEAR attention: convert it first "
                          "(clear-surgery convert --model ... --radius R --out FOLDER) and export that folder")
    family = family_for_class(model_class)
    plan = family.export_plan if family is not None else None
    if plan is None:
        raise ExportError(f"{model_class} ({family.name if family else 'unknown'} family) cannot be exported yet")
    problems = schema.engine_refusals({"pool_weight": config.get("down_factor")})
    if config.get("image_attention", "dense") != "dense":
        problems.append("image_attention='local': engines of image-only CLEAR attention (no text segment) are not "
                        "built yet")
    if problems:
        raise ExportError(f"{what}: an exported engine cannot serve its CLEAR attention: " + "; ".join(problems))
    profile = SizeProfile(*(parse_size(sizes[k], f"--{k}-size") if isinstance(sizes[k], str) else tuple(sizes[k])
                            for k in ("min", "opt", "max")), pixels_per_token=plan.pixels_per_token)
    profile.check()
    return profile


def prepare(source: str | ModelRef, sizes: dict, *, dtype: str | None, batch: int = 1, text_len: int | None = None,
            kernel_tile: bool = False, device: str = "cpu") -> Prepared:
    """Load ``source`` (it must be a converted model), check every option, build the export wrapper and
    its example inputs at the opt size. ``kernel_tile``: run the tile layout of the self-contained kernel
    (engines need it; the weights do not change)."""
    torch_dtype = parse_dtype(dtype, "--dtype")
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"--batch must be a positive integer, got {batch!r}")
    if isinstance(source, torch.nn.Module):  # a model in memory (Python API)
        model, ref = (source.to(torch_dtype) if dtype else source), None
        what = f"this {type(model).__name__}"
    else:
        model, ref = load_model(source, dtype=torch_dtype)
        what = f"{ref.source} is {ref.describe()}"
    state = get_clear_state(model)
    profile = check_exportable(what, type(model).__name__, state and state.config.to_dict(), sizes)
    plan = state.family.export_plan
    notes = []
    if kernel_tile:
        notes += _use_kernel_tile(model)
    model = model.to(device)
    text_len = plan.text_len if text_len is None else text_len
    if not isinstance(text_len, int) or text_len < 1:
        raise ExportError(f"--text-len must be a positive integer, got {text_len!r}")
    wrapper = plan.wrap(model).eval()
    param = next(model.parameters())
    rows, cols = profile.grid("opt")
    inputs = plan.inputs(model, text_len, rows, cols, batch, param.dtype, param.device)
    return Prepared(model, ref, plan, wrapper, inputs, dynamic_shapes(plan, model, inputs, profile), profile,
                    param.dtype, text_len, batch, notes)


def _use_kernel_tile(model) -> list[str]:
    """Re-apply CLEAR with the self-contained kernel's tile layout (attention math unchanged)."""
    from clear_surgery.plugins.triton_aot import aot_tile

    state = get_clear_state(model)
    head_dims = {s.head_dim for s in state.analysis.sites if s.module in state.sites}
    tile = aot_tile(head_dims.pop()) if len(head_dims) == 1 else None
    if tile is None:
        raise ExportError(f"converted sites have several head dims {sorted(head_dims)}: not exportable to an engine")
    if state.config.token_layout == "tiled" and tuple(state.config.tile_shape or ()) == tile:
        return []
    settings = {**state.config.to_dict(), "token_layout": "tiled", "tile_shape": list(tile)}
    analysis, provenance, backend = state.analysis, state.provenance, state.runtime.backend
    remove_clear(model)
    apply_clear(model, ClearConfig.from_dict(settings), backend=backend, analysis=analysis, verify=False,
                provenance=provenance)
    return [f"token layout: tiled {tile[0]}x{tile[1]} (the engine kernel's; outputs are the same)"]


def dynamic_shapes(plan, model, inputs: dict, sizes: SizeProfile) -> dict:
    """torch.export dynamic shapes: the grid dims of the plan's inputs, within the size profile."""
    from torch.export import Dim

    (rmin, cmin), (rmax, cmax) = sizes.grid("min"), sizes.grid("max")
    rows, cols = Dim("rows", min=rmin, max=rmax), Dim("cols", min=cmin, max=cmax)
    shapes = {name: None for name in inputs}
    for name, ((row_dim, row_unit), (col_dim, col_unit)) in plan.grid_dims(model).items():
        if name in inputs:
            shapes[name] = {row_dim: rows * row_unit if row_unit > 1 else rows,
                            col_dim: cols * col_unit if col_unit > 1 else cols}
    return shapes


def input_specs(prepared: Prepared) -> dict:
    """Per input: dtype and shape at min / opt / max size (for manifests and engine profiles)."""
    specs = {}
    grid_dims = prepared.plan.grid_dims(prepared.model)
    for name, tensor in prepared.inputs.items():
        entry = {"dtype": str(tensor.dtype).removeprefix("torch.")}
        for which in ("min", "opt", "max"):
            shape = list(tensor.shape)
            if name in grid_dims:
                (row_dim, row_unit), (col_dim, col_unit) = grid_dims[name]
                rows, cols = prepared.sizes.grid(which)
                shape[row_dim], shape[col_dim] = rows * row_unit, cols * col_unit
            entry[which] = shape
        specs[name] = entry
    return specs


def manifest(prepared: Prepared, fmt: str, files: list[str], **extra) -> dict:
    state = get_clear_state(prepared.model)
    return {"format": f"clear-surgery/{fmt}", "clear_surgery_version": package_version(),
            "model_class": type(prepared.model).__name__,
            "source": prepared.ref.record() if prepared.ref is not None else {"id": "a model in memory"},
            "clear_config": state.config.to_dict(), "sites": list(state.sites), "dtype": str(prepared.dtype)
            .removeprefix("torch."), "batch": prepared.batch, "text_len": prepared.text_len,
            "sizes": prepared.sizes.to_dict(), "inputs": input_specs(prepared),
            "outputs": prepared.plan.output_names(prepared.model), "files": files, "notes": prepared.notes, **extra}


def out_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
