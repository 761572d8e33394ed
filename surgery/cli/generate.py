"""``clear-surgery generate``: an image from a CLEAR model in the stock diffusers pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.core.errors import MismatchError
from clear_surgery.surgery.tools.arguments import IMAGE_SUFFIXES, check, image_format, in_range, output_file, run_device

from .app import INVOCATION, MODEL_HELP, app, check_sources, resolve, user_errors


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + " (with a pipeline around it)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    height: Optional[int] = typer.Option(None, min=1, help="default 1024"),
    width: Optional[int] = typer.Option(None, min=1, help="default 1024"),
    steps: Optional[int] = typer.Option(None, min=1, help="default 28"),
    guidance: Optional[float] = typer.Option(None, help=">= 0"),
    seed: Optional[int] = typer.Option(None, min=0),
    from_size: Optional[int] = typer.Option(None, min=1, help="SDEdit: generate at this size first, then refine"),
    strength: Optional[float] = typer.Option(None, help="SDEdit strength in (0, 1], default 0.7"),
    ntk_factor: Optional[float] = typer.Option(None, help="scale RoPE theta (NTK) for high resolution (> 0)"),
    proportional_attention: Optional[bool] = typer.Option(None, help="scale = sqrt(log_4608(N) / d)"),
    radius: Optional[float] = typer.Option(None, help="convert a dense model on the fly with this radius"),
    require_clear: Optional[bool] = typer.Option(None, help="refuse a model without CLEAR attention"),
    recipe: Optional[Path] = typer.Option(None, help=r"TOML recipe with a \[generate] table (flags override it)"),
    out: Path = typer.Option(Path("image.png"), "--out", "-o", help="image file (.png, .jpg, .webp, ...)"),
    overwrite: bool = typer.Option(False, help="replace an existing image"),
    device: Optional[str] = typer.Option(None, help="where the pipeline runs (cpu, cuda, cuda:1, ...); default: "
                                         "cuda when there is a GPU, else cpu"),
    quantize: Optional[str] = typer.Option(None, help="fp8: FP8 linear layers (torchao; a GPU with FP8 tensor "
                                           "cores, compute capability >= 8.9)"),
    fp8_attention: bool = typer.Option(False, help="CLEAR's image queries in FP8 (e4m3) attention: the gluon-fp8 "
                                       "kernel, Hopper GPUs"),
    compiled: bool = typer.Option(False, "--compile", help="torch.compile the transformer (the first step compiles; "
                                 "FP8 linear layers gain only compiled)"),
    compile_regional: bool = typer.Option(False, "--compile-regional", help="torch.compile each repeated block "
                                          "instead of the whole transformer (diffusers' compile_repeated_blocks: "
                                          "the first step compiles one graph per block class)"),
    nproc: int = typer.Option(1, min=1, help="patch parallel: split the image into row bands over N processes "
                                             "(launched with torchrun; one GPU each where there are GPUs)"),
):
    """Generate an image with a CLEAR model in the stock diffusers pipeline (optionally SDEdit from a base size)."""
    with user_errors():
        output_file("--out", out, IMAGE_SUFFIXES, overwrite=overwrite)
        device = run_device("--device", device)
        from clear_surgery.surgery.tools.quantize import (check_fp8_attention, check_quantize, fp8_attention_pipeline,
                                                          quantize_pipeline)

        check_quantize("--quantize", quantize, device)
        check_fp8_attention("--fp8-attention", fp8_attention, device)
        in_range("--radius", radius, 0)
        flags = dict(prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                     from_size=from_size, strength=strength, ntk_factor=ntk_factor,
                     proportional_attention=proportional_attention, require_clear=require_clear)
        from clear_surgery.surgery.tools.generate import GenerateSettings, generate as run

        if recipe is not None:
            settings = GenerateSettings.from_recipe(recipe, **flags)
        else:
            check(prompt is not None, "--prompt is required (or a --recipe that sets it)")
            settings = GenerateSettings(**{"height": 1024, "width": 1024, **{k: v for k, v in flags.items()
                                                                              if v is not None}})
        check_sources(model)
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            from clear_surgery.surgery.tools.launch import relaunch_under_torchrun

            raise typer.Exit(relaunch_under_torchrun(nproc, "--nproc", INVOCATION, "clear_surgery.surgery.cli"))
        from clear_surgery.hub.atomic import atomic_file
        from clear_surgery.surgery.tools.pipeline import load_pipeline

        ref = resolve(model)
        if ref.is_clear and radius is not None:
            raise MismatchError(f"{model} is {ref.describe()} at r={ref.meta['config']['radius']:g} already: "
                                "--radius converts a dense model on the fly; drop it (or convert the base model "
                                "at the radius you want)")
        pipe = load_pipeline(ref, radius)
        from clear_surgery.surgery.tools.launch import join_patch_parallel

        if "WORLD_SIZE" not in os.environ:  # under torchrun each process takes its own GPU
            pipe.to(device)
        rank = join_patch_parallel(pipe)
        quantize_pipeline(pipe, quantize)
        if fp8_attention:
            fp8_attention_pipeline(pipe)
        if compiled or compile_regional:
            from clear_surgery.surgery.tools.pipeline import compile_pipeline

            compile_pipeline(pipe, regional=compile_regional)
        image = run(pipe, settings, progress=rank == 0 and None)
        if rank == 0:
            with atomic_file(out) as tmp:
                image.save(tmp, format=image_format(out))
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        typer.echo(f"wrote {out} ({image.height}x{image.width}, height x width)" + (f"; patch parallel over {world} processes"
                                                                      if world > 1 else ""))
