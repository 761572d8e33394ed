"""The ``clear-surgery`` command line: one module per command (each registers itself on ``app``),
what they share in ``app.py``. Logic lives in the tools below (``clear_surgery.surgery.tools``)."""

from __future__ import annotations

import sys

import typer

# each module registers its command on ``app``; --help lists them in this order
from . import analyze, convert, profile, generate, check_transfer, coverage, distill, push_to_hub, export, bench  # noqa: F401, I001
from .app import INVOCATION, app, command_line, quiet_libraries


def main(argv: list[str] | None = None) -> int:
    """The ``clear-surgery`` console script; returns the exit code (2: bad input, one ``error:`` line)."""
    quiet_libraries()
    args = sys.argv[1:] if argv is None else list(argv)
    INVOCATION[:] = args
    try:
        code = command_line()(args, prog_name="clear-surgery", standalone_mode=False)
    except typer.TyperException as err:  # unknown option, missing or unparsable value: one line
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: its help, as a question
            typer.echo(ctx.get_help())
            return 0
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        typer.secho(f"error: {' '.join(err.format_message().split())}{where}", fg=typer.colors.RED, err=True)
        return 2
    except typer.Abort:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        return 130
    return code or 0


__all__ = ["app", "main"]
