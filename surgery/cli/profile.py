"""``clear-surgery profile``: how local a model's attention is, and a radius that keeps most of it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.core.config import IMAGE_ATTENTION
from clear_surgery.surgery.core.errors import InvalidValueError
from clear_surgery.surgery.tools.arguments import check, in_range, numbers, output_folder, run_device

from .app import MODEL_HELP, app, check_sources, resolve, user_errors


@app.command()
def profile(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + " (with a pipeline around it)"),
    prompt: str = typer.Option("a photo of a cat in a city at night", help="prompt for the denoising run"),
    resolution: int = typer.Option(512, min=1, help="image side in pixels"),
    steps: int = typer.Option(4, min=1, help="denoising steps"),
    radii: str = typer.Option("2,4,8,16,32", help="radii to measure (each > 0)"),
    keep: float = typer.Option(0.95, help="attention-mass share a recommended radius must keep, in (0, 1]"),
    queries: int = typer.Option(256, min=1, help="sampled image queries per attention call"),
    out: Path = typer.Option(Path("locality"), "--out", "-o", help="folder for locality.json and PNGs (written "
                                                                   "atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    device: Optional[str] = typer.Option(None, help="where the pipeline runs (cpu, cuda, cuda:1, ...); default: "
                                         "cuda when there is a GPU, else cpu"),
    quantize: Optional[str] = typer.Option(None, help="fp8: FP8 linear layers (torchao; a GPU with FP8 tensor "
                                           "cores, compute capability >= 8.9)"),
    image_attention: str = typer.Option("dense", help="dense | local: also measure image-only self-attention sites "
                                        "(what --image-attention local in convert would keep)"),
    reference_image: Optional[Path] = typer.Option(None, help="an image file: run FLUX.1 Kontext with it as the "
                                                   "reference image (its tokens follow the target's on a grid of "
                                                   "their own) and also measure what each rule for the other image "
                                                   "keeps"),
):
    """Measure how local a model's attention is (dense run) and recommend a CLEAR radius.
    A CLEAR folder is measured with its weights and dense attention."""
    with user_errors():
        radius_list = numbers("--radii", radii, float)
        device = run_device("--device", device)
        from clear_surgery.surgery.tools.quantize import check_quantize, quantize_pipeline

        check_quantize("--quantize", quantize, device)
        check(image_attention in IMAGE_ATTENTION, f"--image-attention must be one of {', '.join(IMAGE_ATTENTION)}, got "
                                                  f"{image_attention!r}")
        in_range("--keep", keep, 0, 1)
        output_folder("--out", out, overwrite)
        check_sources(model)
        from clear_surgery.hub.atomic import atomic_directory
        from clear_surgery.surgery import family_of, get_clear_state, remove_clear
        from clear_surgery.surgery.tools.pipeline import load_pipeline
        from clear_surgery.surgery.tools.profile import profile_pipeline

        reference = _read_image("--reference-image", reference_image) if reference_image else None
        pipe = load_pipeline(resolve(model))
        if get_clear_state(pipe.transformer) is not None:
            remove_clear(pipe.transformer)
        _check_image_size(pipe, resolution)
        extra = family_of(pipe.transformer).call_kwargs(pipe)
        if reference is not None:
            from clear_surgery.surgery.tools.pipeline import with_reference_image

            pipe = with_reference_image(pipe)  # the reference at its own size (a multiple of the size step)
            extra.update(image=reference, _auto_resize=False, max_area=resolution * resolution)
        pipe.to(device)
        quantize_pipeline(pipe, quantize)
        pipe.set_progress_bar_config(desc="denoising")
        with atomic_directory(out, overwrite) as tmp:
            results = profile_pipeline(pipe, prompt, resolution, resolution, steps, radius_list, keep=keep,
                                       queries_per_call=queries, out=tmp, image_attention=image_attention, **extra)
    for r, kept in zip(results["radii"], results["kept_share_mean"]):
        typer.echo(f"r = {r:>5g}: mean attention mass kept (text + window) {kept:.3f}")
    for rule, kept in results.get("several_images_kept_share_mean", {}).items():
        typer.echo(f"other images, {rule}: " + ", ".join(f"r={r:g} {k:.3f}" for r, k in zip(results["radii"], kept)))
    typer.echo(f"recommended radius (keeps >= {keep:g}): {results['recommended_radius']}")
    typer.echo(f"wrote {out}/locality.json, locality_heatmap.png, attention_maps.png")


def _read_image(option: str, path: Path):
    """An image file as an RGB PIL image; one clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InvalidValueError(f"{option} {path}: not a readable image ({err})") from err


def _check_image_size(pipe, resolution: int) -> None:
    from clear_surgery.surgery.tools.generate import size_multiple

    multiple = size_multiple(pipe)
    check(resolution % multiple == 0, f"--resolution {resolution} is not a multiple of {multiple} (this "
                                       "pipeline's size step)")
