"""Deployment formats of a converted model: ONNX (ClearAttention nodes), TensorRT engines (the
``clear::ClearAttention`` AOT plugin) and AOTInductor packages. One file per format; ``export_model`` is
what ``clear-surgery export`` runs."""

from __future__ import annotations

from pathlib import Path

from .common import AOTI_ATTENTION, DTYPES, FORMATS, MANIFEST_FILE, ExportError, SizeProfile, check_options, parse_size

DEFAULT_SIZES = {"min": "512x512", "opt": "1024x1024", "max": "2048x2048"}


def export_model(source, out: str | Path, fmt: str, *, sizes: dict | None = None, dtype: str | None = None,
                 batch: int = 1, text_len: int | None = None, overwrite: bool = False, timing_cache=None,
                 kernel_tile: bool = False, aoti_attention: str | None = None, progress=None) -> dict:
    """Export a converted model (any form the model resolver takes) as ``fmt`` into the folder ``out``,
    written atomically; returns the manifest. Every option is checked before any work. ``kernel_tile``: an ONNX
    file in the engines' kernel's tile layout (so that an engine can be built from it elsewhere; engines and
    AOTInductor packages with the embedded kernel always are). ``aoti_attention``: where an AOTInductor package's
    CLEAR attention runs, "embedded" (the default: the self-contained kernel in the package, a CUDA GPU needed)
    or "registered" (a call of the ``clear::attention`` op: the loading process imports clear_surgery first;
    fastest backend at run time; CPU packages too)."""
    from clear_surgery.hub.atomic import atomic_directory, check_output_folder, write_json

    from .common import check_before_loading, check_options, manifest, out_files, prepare

    out = Path(out)
    check_output_folder(out, overwrite)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    check_options(fmt, sizes, dtype, aoti_attention)
    check_before_loading(source, sizes)
    import torch

    embedded = fmt == "aoti" and aoti_attention in (None, "embedded")
    step = progress or (lambda message: None)
    step("loading")
    on_gpu = fmt == "aoti" and (embedded or torch.cuda.is_available())  # a package runs where it was compiled for
    prepared = prepare(source, sizes, dtype=dtype, batch=batch, text_len=text_len,
                       kernel_tile=kernel_tile or fmt == "tensorrt" or embedded, device="cuda" if on_gpu else "cpu")
    with atomic_directory(out, overwrite) as tmp:
        extra = {}
        if fmt in ("onnx", "tensorrt"):
            from .onnx import export_onnx

            step("exporting ONNX")
            export_onnx(prepared.wrapper, prepared.inputs, prepared.dynamic_shapes, tmp,
                        output_names=prepared.plan.output_names(prepared.model))
        if fmt == "tensorrt":
            from .common import input_specs
            from .tensorrt import build_engine

            step("building the TensorRT engine")
            extra = build_engine(tmp / "model.onnx", tmp, input_specs(prepared), timing_cache=timing_cache)
        if fmt == "aoti":
            from .aoti import export_aoti

            step("compiling with AOTInductor")
            extra = export_aoti(prepared, tmp, attention="embedded" if embedded else "registered")
        data = manifest(prepared, fmt, out_files(tmp) + [MANIFEST_FILE], **extra)
        write_json(tmp / MANIFEST_FILE, data)
    return data


__all__ = ["AOTI_ATTENTION", "DEFAULT_SIZES", "DTYPES", "ExportError", "FORMATS", "MANIFEST_FILE", "SizeProfile",
           "check_options", "export_model", "parse_size"]
