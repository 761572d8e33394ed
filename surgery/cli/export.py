"""``clear-surgery export``: ONNX, a TensorRT engine or an AOTInductor package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.tools.arguments import check, output_folder

from .app import MODEL_HELP, app, check_sources, model_argument, stages, user_errors


@app.command("export")
def export_command(
    source: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="the same as --model (kept for one release)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a converted CLEAR model: " + MODEL_HELP),
    out_format: str = typer.Option(..., "--format", "-f", help="onnx | tensorrt | aoti"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    min_size: str = typer.Option("512x512", help="smallest image served, HEIGHTxWIDTH in pixels"),
    opt_size: str = typer.Option("1024x1024", help="the size engines are tuned for (and traced at)"),
    max_size: str = typer.Option("2048x2048", help="largest image served"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: as stored)"),
    batch: int = typer.Option(1, min=1, help="batch size of the exported model"),
    text_len: Optional[int] = typer.Option(None, min=1, help="text tokens (default: the family's, e.g. 512 for "
                                                             "FLUX.1)"),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache to start from"),
    kernel_tile: bool = typer.Option(False, help="onnx: write the engine kernel's tile token layout, so that a "
                                                 "TensorRT engine can be built from the file elsewhere"),
    aoti_attention: Optional[str] = typer.Option(
        None, help="aoti: where CLEAR attention runs. embedded (default): the Triton kernel compiled into the package, "
                   "which loads without clear-surgery (CUDA GPU needed); registered: the package calls the "
                   "clear::attention op, so the loading process imports clear_surgery first and runs its fastest "
                   "kernel (on Hopper the Gluon one); CPU packages too"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Export a converted model for deployment: ONNX with ClearAttention nodes, a TensorRT engine running
    the CLEAR plugin, or an AOTInductor package."""
    with user_errors():
        model = model_argument(model, source)
        output_folder("--out", out, overwrite)
        check(timing_cache is None or timing_cache.is_file(), f"--timing-cache {timing_cache} does not exist")
        from clear_surgery.export.common import check_before_loading, check_options

        sizes = {"min": min_size, "opt": opt_size, "max": max_size}
        check_options(out_format, sizes, dtype, aoti_attention)
        check_sources(model)
        check_before_loading(model, sizes)  # from the model's configs: before any progress output
        from clear_surgery.export import export_model

        count = {"onnx": 2, "tensorrt": 3, "aoti": 2}[out_format] + 1  # loading, exporting (, building), done
        with stages("export", total=count) as step:
            data = export_model(model, out, out_format, sizes=sizes, dtype=dtype, batch=batch, text_len=text_len,
                                overwrite=overwrite, timing_cache=timing_cache, kernel_tile=kernel_tile,
                                aoti_attention=aoti_attention, progress=step)
            step.finish("done")
    sizes = data["sizes"]
    typer.echo(f"exported {data['model_class']} ({len(data['sites'])} CLEAR sites, r={data['clear_config']['radius']:g}) "
               f"as {out_format} for {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]} px, "
               f"{data['dtype']}; wrote {out}: {', '.join(data['files'])}")
