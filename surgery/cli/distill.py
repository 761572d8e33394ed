"""``clear-surgery distill``: heal a CLEAR model against its dense teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.tools.arguments import check, check_device

from .app import MODEL_HELP, app, check_sources, user_errors


@app.command()
def distill(
    recipe: Path = typer.Option(..., "--recipe", help="TOML distillation recipe (see recipes/)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the teacher (overrides model.teacher): "
                                        + MODEL_HELP + "; a CLEAR folder: its base model teaches, its tensors "
                                        "are where the student starts"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: table.key=value (TOML value)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (overrides output.dir)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an earlier run in the output folder"),
    device: Optional[str] = typer.Option(None, help="default: cuda when available (torchrun: this process's GPU)"),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="heal inside a ControlNet pipeline "
                                             "(overrides model.controlnet): " + MODEL_HELP),
    control_images: Optional[Path] = typer.Option(None, "--control-images", help="folder of images (or one) the "
                                                  "ControlNet's conditions are made from (overrides "
                                                  "data.control_images)"),
    condition: Optional[str] = typer.Option(None, "--condition", help="the condition made from each control image: "
                                            "gray | edges (overrides data.condition)"),
    controlnet_attention: Optional[str] = typer.Option(None, "--controlnet-attention", help="the ControlNet's own "
                                                       "attention while the layers heal: dense | clear (zero-shot) | "
                                                       "trained (CLEAR, its attention tensors trained too: "
                                                       "OUT/clear-layers-controlnet)"),
):
    """Heal a CLEAR model against its dense teacher; writes CLEAR layers to OUT/clear-layers.

    Several GPUs: torchrun --nproc_per_node N -m clear_surgery.surgery.cli distill --recipe R.toml
    """
    given = {"model.controlnet": controlnet, "model.controlnet_attention": controlnet_attention,
             "data.control_images": str(control_images.resolve()) if control_images else None,
             "data.condition": condition, "output.dir": str(out) if out else None}
    overrides = [*([f"model.teacher={json.dumps(model)}"] if model else []), *set_,
                 *(f"{key}={json.dumps(value)}" for key, value in given.items() if value is not None)]
    with user_errors():
        check(recipe.is_file(), f"recipe file {recipe} does not exist")
        check(not (resume and overwrite), "--resume and --overwrite exclude each other")
        check_sources(model)
        check_sources(controlnet)
        from clear_surgery.hub import read_clear_config
        from clear_surgery.surgery.tools.distillation import distill as run, load_recipe

        if device is not None:
            check_device("--device", device)
        parsed = load_recipe(recipe, overrides)
        result = run(parsed, resume=resume, overwrite=overwrite, device=device)
    if result is not None:
        metrics = read_clear_config(result, None)["training"]["metrics"]
        typer.echo(f"held-out student-teacher MSE: zero-shot {metrics['zero_shot_student_teacher_mse']:.4g} -> "
                   f"distilled {metrics['eval_student_teacher_mse']:.4g}")
        from clear_surgery.hub.model_card import distillation_made_worse

        if distillation_made_worse(metrics):
            typer.echo("warning: the distilled layers are worse than zero-shot CLEAR on the held-out samples (more "
                       "steps, a lower learning rate or more data may help); the model card says so too", err=True)
        typer.echo(f"wrote {result}")
