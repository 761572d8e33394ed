"""``clear-surgery coverage``: the MMDiT families of the installed diffusers, analyzed and converted."""

from __future__ import annotations



import typer


from .app import app


@app.command()
def coverage():
    """Analyze tiny configs of every MMDiT family in the installed diffusers; print the markdown table."""
    from clear_surgery.surgery.tools.coverage import coverage_table

    typer.echo(coverage_table(progress=True))
