"""TensorRT: an engine built from the ONNX export, every ClearAttention node run by the
``clear::ClearAttention`` AOT plugin (plugins/tensorrt_plugin.py) whose kernel is embedded in the engine.

Built with a strongly typed network (the ONNX file's types are the engine's), one optimization profile
from the size range, and a timing cache kept beside the engine (reused when given). Writes
``engine.plan``, ``timing.cache`` and the manifest's TensorRT fields.

Not verified here: no machine this was written on can install TensorRT. The ONNX file, the plugin's
shape inference, tactics and AOT launch (kernel, grid, arguments) are tested without it; the calls into
TensorRT below follow its documented Python API.
"""

from __future__ import annotations

from pathlib import Path

from clear_surgery.surgery.errors import MissingDependencyError

ENGINE_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"
MIN_VERSION = (10, 10)  # AOT plugins parsed from ONNX


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


def build_engine(onnx_path: Path, out: Path, input_specs: dict, *, timing_cache: Path | None = None,
                 workspace_gib: float | None = None) -> dict:
    """Parse ``onnx_path`` with the plugin registered and write the serialized engine into ``out``.
    ``input_specs``: per input, its min / opt / max shape. Returns the manifest's TensorRT fields."""
    import tensorrt as trt

    from clear_surgery.plugins.tensorrt_plugin import PLUGIN_ID, PLUGIN_VERSION, register

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
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above)")
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    (out / TIMING_CACHE_FILE).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt_version": trt.__version__, "plugin": PLUGIN_ID, "plugin_version": PLUGIN_VERSION,
            "engine": ENGINE_FILE, "timing_cache": TIMING_CACHE_FILE, "strongly_typed": True}
