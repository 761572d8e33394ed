"""``clear-surgery convert``: a model's joint attention to CLEAR, saved as a loadable folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.core.errors import InvalidValueError
from clear_surgery.surgery.tools.arguments import check, check_layers_mode, in_range, output_folder, size_in_bytes

from .app import MODEL_HELP, app, check_sources, resolve, stages, user_errors


@app.command()
def convert(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    radius: Optional[float] = typer.Option(None, "--radius", "-r",
                                           help="CLEAR radius in tokens (strict: d < r); default: from the "
                                                "--clear-layers folder or file name, or the CLEAR folder given"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    clear_layers: Optional[str] = typer.Option(None, "--clear-layers",
                                               help="apply CLEAR layers: a CLEAR-layers folder (from convert "
                                                    "--format layers or distill; local or a Hub id), a safetensors "
                                                    "file (e.g. the official clear_local_16.safetensors) or "
                                                    "OWNER/REPO/FILE on the Hub"),
    allow_radius_change: bool = typer.Option(False, help="use --clear-layers at a --radius other than the one "
                                                         "they were made for"),
    layers_mode: str = typer.Option("replace", help="replace: the model's attention tensors become the layers'; "
                                    "delta: the model's own plus what the layers changed in their base model (layers "
                                    "made on FLUX.1-dev for FLUX.1-schnell)"),
    layers_base: Optional[str] = typer.Option(None, help="delta: the model the layers were made from (default: "
                                              "the one their folder records)"),
    out_format: str = typer.Option("full", "--format", help="full (whole model) | layers (only the CLEAR layers)"),
    radius_for: list[str] = typer.Option([], "--radius-for", help="PATTERN=R: another radius for matching modules"),
    down_factor: Optional[int] = typer.Option(None, "--down-factor",
                                              help="the official 'down' variant: image queries also see the image "
                                                   "pooled over FxF blocks (learned spatial_weight); default: as the "
                                                   "--clear-layers say (clear_local_<r>_down_<f>), else plain CLEAR"),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: as stored)"),
    backend: Optional[str] = typer.Option(None, hidden=True, help="no longer recorded (a run-time choice)"),
    token_layout: str = typer.Option("raster", help="raster | tiled (image tokens permuted into tiles)"),
    image_attention: str = typer.Option("dense", help="dense | local: image-only self-attention sites (SD3.5's "
                                        "attn2) stay dense, or become CLEAR with no text segment"),
    target: list[str] = typer.Option([], "--target", help="convert only modules matching this pattern"),
    exclude: list[str] = typer.Option([], "--exclude", help="leave modules matching this pattern dense"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    max_shard_size: str = typer.Option("10GB", help="largest safetensors shard of a model saved from memory "
                                                    "(models read from files keep their shards)"),
    link: bool = typer.Option(True, help="hard-link the files a conversion leaves unchanged (where the filesystem "
                                         "allows) instead of copying them"),
):
    """Convert a model's joint attention to CLEAR and save it as a loadable folder."""
    with user_errors():
        check(out_format in ("full", "layers"), f"--format must be full or layers, got {out_format!r}")
        check_layers_mode(layers_mode, clear_layers)
        output_folder("--out", out, overwrite)
        in_range("--radius", radius, 0)
        rules = _radius_rules(radius_for)
        shard_bytes = size_in_bytes("--max-shard-size", max_shard_size)
        check_sources(model, clear_layers)
        check_sources(layers_base)
        from clear_surgery.hub import parse_dtype
        from clear_surgery.hub.clear_layers import resolve_layers
        from clear_surgery.surgery import ClearConfig, runtime_backend
        from clear_surgery.surgery.tools.convert import (CONVERT_STAGES, convert as run, default_down_factor,
                                                         default_radius)

        torch_dtype = parse_dtype(dtype)
        if backend is not None:  # folders made with it must load on machines without that backend
            runtime_backend(backend)
            typer.echo("warning: --backend is a run-time choice and is no longer recorded in the folder; choose it "
                       "where the model runs (load_converted(..., backend=...), set_backend)", err=True)
        settings = dict(target_modules=target or None, exclude_modules=exclude,
                        token_layout=token_layout, radius_overrides=rules, image_attention=image_attention)
        ClearConfig(radius=radius or 1, down_factor=down_factor, **settings)  # checked before the model is read
        with stages("convert", total=1 + len(CONVERT_STAGES)) as step:
            step(f"resolving {model}", 0)
            ref = resolve(model, subfolder, revision)
            layers = resolve_layers(clear_layers, revision) if clear_layers else None
            if radius is None:
                radius = default_radius(ref, layers)
            if down_factor is None:
                down_factor = default_down_factor(ref, layers)
            config = ClearConfig(radius=radius, down_factor=down_factor, **settings)
            result = run(ref, out, config, dtype=torch_dtype, clear_layers=layers, out_format=out_format,
                         overwrite=overwrite, max_shard_size=shard_bytes, link=link,
                         allow_radius_change=allow_radius_change, layers_mode=layers_mode, layers_base=layers_base,
                         stage=step)
            step.finish("done")
    typer.echo(result.analysis.table())
    how = (f"; shards: {result.linked} linked, {result.copied} copied, {result.rewritten} rewritten"
           if result.streamed and out_format == "full" else "")
    variant = f", pooled keys {down_factor}x{down_factor}" if down_factor else ""
    variant += "".join(f"; r={r:g} for {pattern}" for pattern, r in rules.items())
    kinds = {site.module: site.kind for site in result.analysis.sites}
    image_only = sum(kinds.get(name) == "image" for name in result.sites)
    joint = len(result.sites) - image_only
    what = f"{joint} joint attention site{'' if joint == 1 else 's'}" + (
        f" and {image_only} image-only one{'' if image_only == 1 else 's'}" if image_only else "")
    typer.echo(f"converted {what} to CLEAR (r={radius:g}{variant}); wrote {out}{how}")


def _radius_rules(rules: list[str]) -> dict[str, float]:
    parsed = {}
    for rule in rules:
        pattern, sep, value = rule.rpartition("=")
        try:
            parsed[pattern] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise InvalidValueError(f"--radius-for takes PATTERN=RADIUS, got {rule!r}")
        in_range(f"--radius-for {pattern}", parsed[pattern], 0)
    return parsed
