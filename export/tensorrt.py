"""TensorRT: an engine built from the ONNX export, every ClearAttention node run by the
``clear::ClearAttention`` AOT plugin (plugins/tensorrt_plugin.py) whose kernel is embedded in the engine.

Built with a strongly typed network (the ONNX file's types are the engine's), one optimization profile
from the size range, and a timing cache kept beside the engine (reused when given). Writes
``engine.plan``, ``timing.cache`` and the manifest's TensorRT fields.

Not verified here: no machine this was written on can install TensorRT itself. The plugin is tested
against TensorRT's own Python plugin package (its validators, creator, autotune and AOT steps, called as the
parser and builder call them) and its kernel launched on a GPU as TensorRT's AOT runtime launches it; the
builder calls below (parse, profile, timing cache, build) follow TensorRT's Python API unexercised.

Known upstream issue (TensorRT 11.1 to 11.2.1, NVIDIA/TensorRT#4849): an execution context running an AOT
plugin keeps a CUDA module each time its input shapes change. An engine of this kind serves a range of
resolutions, so on those versions the build warns, and a server should keep one execution context per
resolution it serves (a fixed set), not switch one context between many sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from clear_surgery.surgery.core.errors import InvalidValueError, MissingDependencyError

class ExportLayoutError(InvalidValueError):
    """An ONNX file or timing cache an engine cannot be built from."""


ENGINE_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"
MIN_VERSION = (10, 10)  # AOT plugins parsed from ONNX
LEAKING_VERSIONS = ((11, 1), (11, 2))  # NVIDIA/TensorRT#4849 (module docstring)


def tensorrt_version() -> str:
    """The installed TensorRT's version; one clear error when it is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise MissingDependencyError(
            f"TensorRT is not installed ({err}). --format tensorrt needs the tensorrt Python package >= "
            f"{'.'.join(map(str, MIN_VERSION))} on a machine with an NVIDIA GPU; or export --format onnx here and "
            "build the engine where TensorRT is (see README: TensorRT engines)") from err
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        raise MissingDependencyError(f"TensorRT {trt.__version__} is too old: AOT plugins from ONNX need >= "
                           f"{'.'.join(map(str, MIN_VERSION))}")
    return trt.__version__


def check_onnx_for_engine(onnx_path: Path) -> None:
    """An engine runs every ClearAttention node on the self-contained kernel, which takes the tile token
    layout only: refuse a file whose nodes are in raster order (or another tile) before TensorRT sees it."""
    import onnx

    from clear_surgery.export.onnx import clear_nodes, node_attributes
    from clear_surgery.plugins.triton_aot import aot_tile
    from clear_surgery.plugins.triton_backend import HEAD_DIMS

    tiles = {aot_tile(d) for d in HEAD_DIMS}
    wrong = sorted({(a["tile_h"], a["tile_w"]) for a in map(node_attributes, clear_nodes(
        onnx.load(str(onnx_path), load_external_data=False))) if (a["tile_h"], a["tile_w"]) not in tiles})
    if wrong:
        found = ", ".join("raster order" if t == (0, 0) else f"{t[0]}x{t[1]} tiles" for t in wrong)
        raise ExportLayoutError(f"{onnx_path}: its ClearAttention nodes use {found}; a TensorRT engine's kernel needs "
                                f"the {'/'.join(f'{h}x{w}' for h, w in sorted(tiles))} tile token layout: export "
                                "with --format tensorrt, or --format onnx --kernel-tile for a file to build elsewhere")


def build_engine(onnx_path: Path, out: Path, input_specs: dict, *, timing_cache: Path | None = None,
                 workspace_gib: float | None = None) -> dict:
    """Parse ``onnx_path`` with the plugin registered and write the serialized engine into ``out``.
    ``input_specs``: per input, its min / opt / max shape. Returns the manifest's TensorRT fields."""
    import tensorrt as trt

    from clear_surgery.plugins.tensorrt_plugin import PLUGIN_ID, PLUGIN_VERSION, register

    check_onnx_for_engine(onnx_path)
    if tuple(int(p) for p in trt.__version__.split(".")[:2]) in LEAKING_VERSIONS:
        warnings.warn(f"TensorRT {trt.__version__}: AOT plugins keep a CUDA module per input-shape change "
                      "(NVIDIA/TensorRT#4849); serve a fixed set of sizes, one execution context each", stacklevel=2)
    register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for name, spec in input_specs.items():
        profile.set_shape(name, spec["min"], spec["opt"], spec["max"])
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ExportLayoutError(f"--timing-cache {timing_cache} was made by another TensorRT or GPU: TensorRT "
                                "refused it (start without it)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above)")
    with open(out / ENGINE_FILE, "wb") as engine:  # from TensorRT's buffer: no second copy of a large engine
        engine.write(memoryview(serialized))
    with open(out / TIMING_CACHE_FILE, "wb") as timing:
        timing.write(memoryview(config.get_timing_cache().serialize()))
    return {"tensorrt_version": trt.__version__, "plugin": PLUGIN_ID, "plugin_version": PLUGIN_VERSION,
            "engine": ENGINE_FILE, "timing_cache": TIMING_CACHE_FILE, "strongly_typed": True}
