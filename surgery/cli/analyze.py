"""``clear-surgery analyze``: every attention site of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.tools.arguments import output_file

from .app import MODEL_HELP, app, check_sources, resolve, user_errors


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    overwrite: bool = typer.Option(False, help="replace an existing --json file"),
):
    """List every attention site of a model: owner, kind, segment order, token counts, rewritable or why not."""
    with user_errors():
        output_file("--json", json_out, overwrite=overwrite)
        check_sources(model)
        from clear_surgery.hub import load_model
        from clear_surgery.hub.atomic import write_text
        from clear_surgery.surgery import analyze as run_analysis

        loaded, _ = load_model(resolve(model, subfolder, revision))
        report = run_analysis(loaded)
        typer.echo(report.table())
        if json_out:
            write_text(json_out, report.to_json() + "\n")
            typer.echo(f"wrote {json_out}")
