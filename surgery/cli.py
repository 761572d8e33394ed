"""The ``clear-surgery`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.errors import ClearSurgeryError, InvalidValueError, MismatchError
from clear_surgery.surgery.tools.arguments import (IMAGE_SUFFIXES, check, check_device, check_layers_mode, image_format,
                                                   in_range, numbers, output_file, output_folder, size_in_bytes)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Linearize diffusion transformers with CLEAR local attention.")

MODEL_HELP = ("builtin:NAME, a local diffusers model or pipeline folder, a converted CLEAR folder, a CLEAR-layers "
              "folder, or a Hub id of any of these")
_INVOCATION: list[str] = []  # the arguments main() was called with (to relaunch a command under torchrun)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, ClearSurgeryError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors():
    """One ``error: ...`` line and exit code 2 for what the user's input or machine causes: clear-surgery's
    own errors, bad values (ValueError) and files, paths, disks and networks (OSError). Anything else is
    a bug and keeps its traceback."""
    try:
        yield
    except (ClearSurgeryError, ValueError, OSError) as err:
        _fail(_one_line(err))


def _quiet_libraries() -> None:
    """Library notices a user cannot act on (set before the libraries are imported)."""
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(torchvision|TorchScript|torch.jit).*")
    for name in ("diffusers", "transformers", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                 "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch sets its loggers' levels itself, from this
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _check_sources(model: str | None, file: str | None = None) -> None:
    """Fail within seconds (before torch is imported) when a model or file argument can only come from an
    unreachable Hub and the local cache does not have it."""
    from clear_surgery.hub.download import require_reachable
    from clear_surgery.hub.resolve import check_not_bare_builtin

    if model:
        check_not_bare_builtin(model)
        require_reachable(model)
    if file:
        require_reachable(file, file=True)


@contextlib.contextmanager
def _stages(desc: str, total: int | None = None):
    """A stage counter on stderr: ``step(message, n)`` shows the stage starting; the bar's last line
    (written when it closes) is printed once, not again after the final step."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="stage", file=sys.stderr) as bar:
        def step(message: str, n: int = 1) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(n)
            bar.refresh()

        def finish(message: str | None = None) -> None:  # counted, shown by close()
            if message:
                bar.set_postfix_str(message, refresh=False)
            bar.n = bar.total if bar.total is not None else bar.n + 1

        step.finish = finish
        yield step


def _resolve(model: str, subfolder=None, revision=None):
    from clear_surgery.hub import resolve_model

    return resolve_model(model, subfolder=subfolder, revision=revision)


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
        _check_sources(model)
        from clear_surgery.hub import load_model
        from clear_surgery.hub.atomic import write_text
        from clear_surgery.surgery import analyze as run_analysis

        loaded, _ = load_model(_resolve(model, subfolder, revision))
        report = run_analysis(loaded)
        typer.echo(report.table())
        if json_out:
            write_text(json_out, report.to_json() + "\n")
            typer.echo(f"wrote {json_out}")


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
        _check_sources(model, clear_layers)
        _check_sources(layers_base)
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
                        token_layout=token_layout, radius_overrides=rules)
        ClearConfig(radius=radius or 1, down_factor=down_factor, **settings)  # checked before the model is read
        with _stages("convert", total=1 + len(CONVERT_STAGES)) as step:
            step(f"resolving {model}", 0)
            ref = _resolve(model, subfolder, revision)
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
    typer.echo(f"converted {len(result.sites)} joint attention site{'' if len(result.sites) == 1 else 's'} to CLEAR (r={radius:g}{variant}); wrote {out}{how}")


def _model_argument(option: str | None, positional: str | None) -> str:
    """The model of a command that used to take it as a positional argument: --model, as every command does;
    the positional form still works, with a note, for one release."""
    if option is not None and positional is not None:
        raise InvalidValueError(f"give the model once: --model {option} or the positional {positional}, not both")
    if option is None and positional is None:
        raise InvalidValueError("missing --model: the model to use (" + MODEL_HELP + ")")
    if positional is not None:
        typer.echo(f"note: the model as a positional argument is deprecated; use --model {positional}", err=True)
    return option or positional


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
    reference_image: Optional[Path] = typer.Option(None, help="an image file: run FLUX.1 Kontext with it as the "
                                                   "reference image (its tokens follow the target's on a grid of "
                                                   "their own) and also measure what each rule for the other image "
                                                   "keeps"),
):
    """Measure how local a model's attention is (dense run) and recommend a CLEAR radius.
    A CLEAR folder is measured with its weights and dense attention."""
    with user_errors():
        radius_list = numbers("--radii", radii, float)
        in_range("--keep", keep, 0, 1)
        output_folder("--out", out, overwrite)
        _check_sources(model)
        from clear_surgery.hub.atomic import atomic_directory
        from clear_surgery.surgery import family_of, get_clear_state, remove_clear
        from clear_surgery.surgery.tools.pipeline import load_pipeline
        from clear_surgery.surgery.tools.profile import profile_pipeline

        reference = _read_image("--reference-image", reference_image) if reference_image else None
        pipe = load_pipeline(_resolve(model))
        if get_clear_state(pipe.transformer) is not None:
            remove_clear(pipe.transformer)
        _check_image_size(pipe, resolution)
        extra = family_of(pipe.transformer).call_kwargs(pipe)
        if reference is not None:
            from clear_surgery.surgery.tools.pipeline import with_reference_image

            pipe = with_reference_image(pipe)  # the reference at its own size (a multiple of the size step)
            extra.update(image=reference, _auto_resize=False, max_area=resolution * resolution)
        pipe.set_progress_bar_config(desc="denoising")
        with atomic_directory(out, overwrite) as tmp:
            results = profile_pipeline(pipe, prompt, resolution, resolution, steps, radius_list, keep=keep,
                                       queries_per_call=queries, out=tmp, **extra)
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
    nproc: int = typer.Option(1, min=1, help="patch parallel: split the image into row bands over N processes "
                                             "(launched with torchrun; one GPU each where there are GPUs)"),
):
    """Generate an image with a CLEAR model in the stock diffusers pipeline (optionally SDEdit from a base size)."""
    with user_errors():
        output_file("--out", out, IMAGE_SUFFIXES, overwrite=overwrite)
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
        _check_sources(model)
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            raise typer.Exit(_torchrun(nproc, "--nproc"))
        from clear_surgery.hub.atomic import atomic_file
        from clear_surgery.surgery.tools.pipeline import load_pipeline

        ref = _resolve(model)
        if ref.is_clear and radius is not None:
            raise MismatchError(f"{model} is {ref.describe()} at r={ref.meta['config']['radius']:g} already: "
                                "--radius converts a dense model on the fly; drop it (or convert the base model "
                                "at the radius you want)")
        pipe = load_pipeline(ref, radius)
        rank = _patch_parallel(pipe)
        image = run(pipe, settings, progress=rank == 0 and None)
        if rank == 0:
            with atomic_file(out) as tmp:
                image.save(tmp, format=image_format(out))
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        typer.echo(f"wrote {out} ({image.width}x{image.height})" + (f"; patch parallel over {world} processes"
                                                                      if world > 1 else ""))


@app.command("check-transfer")
def check_transfer(
    target: str = typer.Option(..., "--target", "-m", help="the dense model the layers should work on: "
                               + MODEL_HELP.split(", a converted")[0] + " (with a pipeline around it)"),
    clear_layers: Optional[str] = typer.Option(None, "--clear-layers", help="trained CLEAR layers: a CLEAR-layers "
                                               "folder or safetensors file (local or Hub); omit for zero-shot CLEAR"),
    radius: Optional[float] = typer.Option(None, "--radius", "-r", help="radius (default: the layers'); alone: "
                                           "zero-shot CLEAR"),
    layers_mode: str = typer.Option("replace", help="replace: the target's attention tensors become the layers'; "
                                    "delta: the target's own plus what the layers changed in their base model"),
    layers_base: Optional[str] = typer.Option(None, help="delta: the model the layers were made from (default: "
                                              "the one their folder records)"),
    controlnet: Optional[str] = typer.Option(None, help="a ControlNet model for the target (folder or Hub id)"),
    control_images: Optional[Path] = typer.Option(None, help="condition images for the ControlNet (a folder, used "
                                                             "in name order, or one file)"),
    condition: str = typer.Option("gray", help="how the condition is recomputed from an output: gray or edges"),
    controlnet_attention: Optional[str] = typer.Option(None, help="the ControlNet's own attention: layers (CLEAR "
                                                      "with the layers' changes on the blocks it shares with the "
                                                      "target; the default with --clear-layers), clear (zero-shot "
                                                      "CLEAR; the default without), or dense"),
    prompts: Path = typer.Option(..., help="text file, one prompt per line (cycled)"),
    num_images: int = typer.Option(4, min=1, help="image pairs to make"),
    seed: int = typer.Option(0, min=0, help="image i uses seed + i"),
    steps: Optional[int] = typer.Option(None, min=1, help="denoising steps (default: the pipeline's)"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale >= 0 (default: the pipeline's)"),
    height: Optional[int] = typer.Option(None, min=1, help="default: the pipeline's"),
    width: Optional[int] = typer.Option(None, min=1, help="default: the pipeline's"),
    allow_radius_change: bool = typer.Option(False, help="use layers made for another radius at --radius"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder (written atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing report folder"),
):
    """Check that CLEAR layers transfer: the same prompts, seeds and conditions through the dense target
    and the CLEAR target; PSNR, SSIM, latent MSE (and the condition error with a ControlNet)."""
    with user_errors():
        in_range("--radius", radius, 0)
        check(clear_layers is not None or radius is not None,
              "give --clear-layers (trained CLEAR layers) or --radius (zero-shot CLEAR)")
        check((controlnet is None) == (control_images is None), "--controlnet and --control-images go together")
        controlnet_attention = controlnet_attention or ("layers" if clear_layers else "clear")
        check(controlnet_attention in ("dense", "clear", "layers"), "--controlnet-attention must be dense, clear or "
              f"layers, got {controlnet_attention!r}")
        check(controlnet_attention != "layers" or clear_layers is not None,
              "--controlnet-attention layers needs --clear-layers")
        check_layers_mode(layers_mode, clear_layers)
        output_folder("--out", out, overwrite)
        from clear_surgery.surgery.tools.transfer import TransferSettings, read_prompts

        settings = TransferSettings(prompts=read_prompts(prompts), num_images=num_images, seed=seed, steps=steps,
                                    guidance=guidance, height=height, width=width, condition=condition)
        _check_sources(target, clear_layers)
        _check_sources(controlnet)
        _check_sources(layers_base)
        from clear_surgery.surgery.tools.transfer import check_transfer as run

        metrics = run(target, out, settings, clear_layers=clear_layers, radius=radius, controlnet=controlnet,
                      control_images=control_images, layers_mode=layers_mode, layers_base=layers_base,
                      controlnet_attention=controlnet_attention,
                      allow_radius_change=allow_radius_change, overwrite=overwrite)
    s = metrics["summary"]
    typer.echo(f"{metrics['setup']['mode']} r={metrics['setup']['radius']:g}: PSNR {s['psnr']:.2f} dB, "
               f"SSIM {s['ssim']:.4f}, latent MSE {s['latent_mse']:.4g}"
               + (f", condition MSE {s['condition_mse_original']:.4g} (dense) -> {s['condition_mse_clear']:.4g} "
                  "(CLEAR)" if "condition_mse_clear" in s else ""))
    typer.echo(f"wrote {out}/metrics.json, report.md, grid.png")


def _torchrun(nproc: int, option: str) -> int:
    """Run this command again under torchrun with ``nproc`` processes (``option`` and its value dropped)."""
    import subprocess

    args, skip = [], False
    for arg in _INVOCATION:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "clear_surgery.surgery.cli", *args]
    return subprocess.call(command, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def _patch_parallel(pipe) -> int:
    """Under torchrun: join the group, move the pipeline to this process's GPU (if any) and split the
    CLEAR models' image rows over the processes. Returns this process's rank (0 alone)."""
    import torch
    import torch.distributed as dist

    from clear_surgery.surgery import enable_patch_parallel, get_clear_state
    from clear_surgery.surgery.patch_parallel import init_from_torchrun

    init_from_torchrun()
    if not dist.is_initialized():
        return 0
    if dist.get_rank() > 0:
        pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():
        pipe.to(f"cuda:{torch.cuda.current_device()}")
    for name in ("transformer", "controlnet"):
        model = getattr(pipe, name, None)
        if model is not None:
            if get_clear_state(model) is None:
                raise InvalidValueError(f"patch parallel needs CLEAR attention: the pipeline's {name} is dense "
                                        "(give a CLEAR folder, or --radius to convert it)")
            enable_patch_parallel(model)
    return dist.get_rank()


@app.command()
def coverage():
    """Analyze tiny configs of every MMDiT family in the installed diffusers; print the markdown table."""
    from clear_surgery.surgery.tools.coverage import coverage_table

    typer.echo(coverage_table(progress=True))


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
):
    """Heal a CLEAR model against its dense teacher; writes CLEAR layers to OUT/clear-layers.

    Several GPUs: torchrun --nproc_per_node N -m clear_surgery.surgery.cli distill --recipe R.toml
    """
    overrides = [*([f"model.teacher={json.dumps(model)}"] if model else []), *set_,
                 *([f"output.dir={json.dumps(str(out))}"] if out else [])]
    with user_errors():
        check(recipe.is_file(), f"recipe file {recipe} does not exist")
        check(not (resume and overwrite), "--resume and --overwrite exclude each other")
        _check_sources(model)
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


@app.command("push-to-hub")
def push_to_hub(
    source: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="the same as --model (kept for one release)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a CLEAR folder (converted model or CLEAR "
                                                                    "layers), local or on the Hub"),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hub"),
    private: bool = typer.Option(False, help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if needed)"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: bool = typer.Option(False, help="list what would be uploaded, with sizes, and stop"),
):
    """Validate a CLEAR folder and upload it (token from HF_TOKEN or `hf auth login`, never printed)."""
    with user_errors():
        model = _model_argument(model, source)
        from clear_surgery.hub.download import check_repo_id, require_reachable

        check_repo_id("--repo-id", repo_id)
        _check_sources(model)
        if not dry_run:
            require_reachable(repo_id, upload=True)
        from clear_surgery.hub.push import push_to_hub as push

        ref = _resolve(model)
        if not ref.is_clear:
            raise InvalidValueError(f"{model} is {ref.describe()}: push-to-hub uploads a CLEAR folder (run "
                                    "clear-surgery convert first)")
    try:
        result = push(ref.folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      dry_run=dry_run)
    except Exception as err:
        if not _from_hub_client(err):
            raise
        _fail(f"{type(err).__name__}: {_one_line(err).splitlines()[0]}")  # huggingface_hub's messages carry no token
    if dry_run:
        typer.echo(result.describe())
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        typer.echo(f"uploaded {model} to {repo_id}" + (f": {result.commit_url}" if result is not None else ""))


def _from_hub_client(err: BaseException) -> bool:
    """An error of the Hub, the network or the user's files, not of clear-surgery's code."""
    return isinstance(err, (ClearSurgeryError, ValueError, OSError)) or \
        type(err).__module__.split(".")[0] in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


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
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Export a converted model for deployment: ONNX with ClearAttention nodes, a TensorRT engine running
    the CLEAR plugin, or an AOTInductor package."""
    with user_errors():
        model = _model_argument(model, source)
        output_folder("--out", out, overwrite)
        check(timing_cache is None or timing_cache.is_file(), f"--timing-cache {timing_cache} does not exist")
        from clear_surgery.export.common import check_before_loading, check_options

        sizes = {"min": min_size, "opt": opt_size, "max": max_size}
        check_options(out_format, sizes, dtype)
        _check_sources(model)
        check_before_loading(model, sizes)  # from the model's configs: before any progress output
        from clear_surgery.export import export_model

        stages = {"onnx": 2, "tensorrt": 3, "aoti": 2}[out_format] + 1  # loading, exporting (, building), done
        with _stages("export", total=stages) as step:
            data = export_model(model, out, out_format, sizes=sizes, dtype=dtype, batch=batch, text_len=text_len,
                                overwrite=overwrite, timing_cache=timing_cache, kernel_tile=kernel_tile,
                                progress=step)
            step.finish("done")
    sizes = data["sizes"]
    typer.echo(f"exported {data['model_class']} ({len(data['sites'])} CLEAR sites, r={data['clear_config']['radius']:g}) "
               f"as {out_format} for {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]} px, "
               f"{data['dtype']}; wrote {out}: {', '.join(data['files'])}")


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="folder for JSON and PNG (written "
                                                                        "atomically)"),
    sizes: str = typer.Option("1024,2048,4096,8192", help="image sides in pixels (16 px per token)"),
    radii: str = typer.Option("8,16,32", help="CLEAR radii"),
    backends: str = typer.Option("dense-cudnn,dense-flash,flex-raster,flex-tiled,triton-tiled,gluon-tiled",
                                 help="attention backends to time"),
    step: bool = typer.Option(True, help="also time a FLUX.1-dev-shaped transformer step"),
    step_sizes: str = typer.Option("1024,2048,4096,8192", help="image sides for the step"),
    step_radius: float = typer.Option(16, help="radius for the step"),
    dense_step_max: int = typer.Option(8192, min=16, help="largest size at which the dense step is timed"),
    device: str = typer.Option("cuda", help="cuda (cpu only for smoke tests at tiny sizes)"),
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
        from clear_surgery.hub.atomic import atomic_directory

        meta = {"device": torch_device_name(device), "torch": _torch_version()}
        with atomic_directory(out, overwrite) as tmp:
            rows = b.bench_attention(size_list, radius_list, chosen, heads=heads, head_dim=head_dim, text=text,
                                     device=device)
            (tmp / "attention.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
            typer.echo(_attention_table(rows))
            step_rows = []
            if step:
                step_rows = b.bench_step(step_size_list, step_radius, dense_max=dense_step_max, device=device)
                (tmp / "step.json").write_text(json.dumps({**meta, "rows": step_rows}, indent=1) + "\n")
            b.plot(rows, step_rows, tmp / "bench.png")
    typer.echo(f"wrote {out}/attention.json{', step.json' if step else ''}, bench.png")


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _attention_table(rows) -> str:
    lines = [f"{'res':>5} {'r':>4} {'backend':<14} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} {'vs flex-raster':>14}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['res']:>5} {r['radius'] or '-':>4} {r['backend']:<14} error: {r['error'][:60]}")
            continue
        tf = r.get("tflops_effective", r.get("tflops", float("nan")))
        lines.append(f"{r['res']:>5} {r['radius'] or '-':>4} {r['backend']:<14} {r['ms']:>9.3f} {tf:>8.1f} "
                     f"{r.get('x_floor_dense-cudnn', float('nan')):>8.2f} {r.get('speedup_vs_flex_raster', float('nan')):>14.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``clear-surgery`` console script; returns the exit code (2: bad input, one ``error:`` line)."""
    global _INVOCATION
    _quiet_libraries()
    args = sys.argv[1:] if argv is None else list(argv)
    _INVOCATION = args
    try:
        code = app(args, prog_name="clear-surgery", standalone_mode=False)
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


if __name__ == "__main__":
    sys.exit(main())
