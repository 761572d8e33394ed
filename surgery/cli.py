"""The ``clear-surgery`` command line."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Linearize diffusion transformers with CLEAR local attention.")

MODEL_HELP = "Hub id, local diffusers folder (pipeline or model), CLEAR folder, or builtin:NAME"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _load(model: str, subfolder, dtype, revision):
    from clear_surgery.surgery.loading import load_model, parse_dtype

    return load_model(model, subfolder=subfolder, dtype=parse_dtype(dtype), revision=revision)


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
):
    """List every attention site of a model: owner, kind, segment order, token counts, rewritable or why not."""
    from clear_surgery.surgery.analysis import analyze as run_analysis

    _quiet_libraries()
    try:
        loaded, _ = _load(model, subfolder, None, revision)
        report = run_analysis(loaded)
    except ValueError as err:
        _fail(str(err))
    typer.echo(report.table())
    if json_out:
        json_out.write_text(report.to_json() + "\n")
        typer.echo(f"wrote {json_out}")


@app.command()
def convert(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    radius: float = typer.Option(..., "--radius", "-r", help="CLEAR radius in tokens (strict: d < r)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: as stored)"),
    backend: str = typer.Option("auto", help="CLEAR backend recorded in the config"),
    target: list[str] = typer.Option([], "--target", help="convert only modules matching this pattern"),
    exclude: list[str] = typer.Option([], "--exclude", help="leave modules matching this pattern dense"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    max_shard_size: str = typer.Option("10GB", help="largest safetensors shard"),
):
    """Convert a model's joint attention to CLEAR and save it as a loadable folder."""
    from tqdm.auto import tqdm

    from clear_surgery.hub import save_converted
    from clear_surgery.surgery import ClearConfig, apply_clear

    _quiet_libraries()
    try:
        config = ClearConfig(radius=radius, backend=backend, target_modules=target or None, exclude_modules=exclude)
        if out.exists() and not overwrite:
            raise FileExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
        with tqdm(total=3, desc="convert", unit="stage", file=sys.stderr) as stages:
            stages.set_postfix_str(f"loading {model}")
            loaded, source = _load(model, subfolder, dtype, revision)
            stages.update()
            stages.set_postfix_str("analyze, rewrite, verify")
            report = apply_clear(loaded, config)
            stages.update()
            stages.set_postfix_str(f"saving {out}")
            save_converted(loaded, out, base_model=source.to_dict(), overwrite=overwrite,
                           max_shard_size=max_shard_size)
            stages.update()
    except (ValueError, FileExistsError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(report.table())
    typer.echo(f"converted {len(loaded._clear_sites)} joint attention sites to CLEAR (r={radius:g}); wrote {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
