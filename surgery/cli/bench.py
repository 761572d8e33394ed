"""``clear-surgery bench``: one attention layer and a FLUX.1-dev-shaped step, timed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.tools.arguments import check, check_device, in_range, numbers, output_folder

from .app import app, user_errors


# the layer backends timed unless --backends says otherwise (of tools/bench.py's LAYER_BACKENDS)
DEFAULT_BACKENDS = ("dense-cudnn", "dense-flash", "flex-raster", "flex-tiled", "triton-tiled", "gluon-tiled")


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="folder for JSON and PNG (written "
                                                                        "atomically)"),
    sizes: str = typer.Option("1024,2048,4096,8192", help="image sides in pixels (16 px per token)"),
    radii: str = typer.Option("8,16,32", help="CLEAR radii"),
    backends: str = typer.Option(",".join(DEFAULT_BACKENDS), show_default=False,
                                 help="attention backends to time, comma-separated (default: "
                                      + ", ".join(DEFAULT_BACKENDS) + ")"),
    step: bool = typer.Option(True, help="also time a FLUX.1-dev-shaped transformer step"),
    step_sizes: str = typer.Option("1024,2048,4096,8192", help="image sides for the step"),
    step_radius: float = typer.Option(16, help="radius for the step"),
    dense_step_max: int = typer.Option(8192, min=16, help="largest size at which the dense step is timed"),
    device: str = typer.Option("cuda", help="cuda (cpu only for smoke tests at tiny sizes)"),
    quantize: Optional[str] = typer.Option(None, help="fp8: the step's linear layers in FP8 (torchao; a GPU with FP8 tensor "
                                           "cores, compute capability >= 8.9)"),
    fp8_attention: bool = typer.Option(False, help="the CLEAR step's image queries in FP8 attention (gluon-fp8, "
                                       "Hopper); add gluon-fp8-tiled to --backends for the layer"),
    compiled: bool = typer.Option(False, "--compile", help="time the step under torch.compile (each configuration "
                                  "compiled by its warm-up call; FP8 linear layers gain only compiled)"),
    compile_regional: bool = typer.Option(False, "--compile-regional", help="the same with each repeated block "
                                          "compiled (compile_repeated_blocks): a few small graphs, not the whole model"),
    heads: int = typer.Option(24, min=1), head_dim: int = typer.Option(128, min=1), text: int = typer.Option(512, min=1),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Time one attention layer (dense, flex, triton, gluon) and a FLUX-shaped step; write JSON + PNG."""
    with user_errors():
        output_folder("--out", out, overwrite)
        size_list, radius_list = numbers("--sizes", sizes), numbers("--radii", radii, float)
        step_size_list = numbers("--step-sizes", step_sizes) if step else []
        in_range("--step-radius", step_radius, 0)
        for option, values in (("--sizes", size_list), ("--step-sizes", step_size_list)):
            check(all(v % 16 == 0 for v in values), f"{option} must be multiples of 16 pixels, got {values}")
        from clear_surgery.surgery.tools import bench as b

        chosen = backends.split(",")
        unknown = [name for name in chosen if name not in b.LAYER_BACKENDS]
        check(not unknown, f"--backends: unknown {unknown}; choose from {', '.join(b.LAYER_BACKENDS)}")
        check_device("--device", device)
        from clear_surgery.surgery.tools.quantize import check_fp8_attention, check_quantize

        check_quantize("--quantize", quantize, device)
        check_fp8_attention("--fp8-attention", fp8_attention and step, device)
        from clear_surgery.hub.atomic import atomic_directory

        with atomic_directory(out, overwrite) as tmp:
            b.run_bench(tmp, size_list, radius_list, chosen, heads=heads, head_dim=head_dim, text=text, device=device,
                        step_sizes=step_size_list, step_radius=step_radius, dense_step_max=dense_step_max,
                        quantize=quantize, fp8_attention=fp8_attention,
                        compiled="regional" if compile_regional else "full" if compiled else None, echo=typer.echo)
    typer.echo(f"wrote {out}/attention.json{', step.json' if step else ''}, bench.png")

