"""The ``clear-surgery`` command line."""

from __future__ import annotations

import json
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
    radius: Optional[float] = typer.Option(None, "--radius", "-r",
                                           help="CLEAR radius in tokens (strict: d < r); from the file name with --clear-layers"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    clear_layers: Optional[str] = typer.Option(None, "--clear-layers",
                                               help="apply CLEAR layers: a safetensors file (e.g. the official "
                                                    "clear_local_16.safetensors) or OWNER/REPO/FILE on the Hub"),
    out_format: str = typer.Option("full", "--format", help="full (whole model) | layers (only the CLEAR layers)"),
    radius_for: list[str] = typer.Option([], "--radius-for", help="PATTERN=R: another radius for matching modules"),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: as stored)"),
    backend: str = typer.Option("auto", help="CLEAR backend recorded in the config"),
    token_layout: str = typer.Option("raster", help="raster | tiled (image tokens permuted into tiles)"),
    target: list[str] = typer.Option([], "--target", help="convert only modules matching this pattern"),
    exclude: list[str] = typer.Option([], "--exclude", help="leave modules matching this pattern dense"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    max_shard_size: str = typer.Option("10GB", help="largest safetensors shard"),
):
    """Convert a model's joint attention to CLEAR and save it as a loadable folder."""
    from tqdm.auto import tqdm

    from clear_surgery.hub import save_clear_layers, save_converted
    from clear_surgery.hub.clear_layers import apply_layer_tensors, official_radius, resolve_file
    from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear

    _quiet_libraries()
    try:
        if out_format not in ("full", "layers"):
            raise ValueError(f"--format must be full or layers, got {out_format!r}")
        layers_file = resolve_file(clear_layers, revision) if clear_layers else None
        if layers_file is not None and (radius is None or "down" in layers_file.name):
            file_radius = official_radius(layers_file.name)  # refuses the pooled-key "down" variants
            radius = file_radius if radius is None else radius
        if radius is None:
            raise ValueError("--radius is required (or --clear-layers with a clear_local_<r> file)")
        config = ClearConfig(radius=radius, backend=backend, target_modules=target or None, exclude_modules=exclude,
                             token_layout=token_layout, radius_overrides=_radius_rules(radius_for))
        if out.exists() and not overwrite:
            raise FileExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
        with tqdm(total=3, desc="convert", unit="stage", file=sys.stderr) as stages:
            stages.set_postfix_str(f"loading {model}")
            loaded, source = _load(model, subfolder, dtype, revision)
            stages.update()
            stages.set_postfix_str("analyze, rewrite, verify")
            report = apply_clear(loaded, config)
            if layers_file is not None:
                try:
                    apply_layer_tensors(loaded, layers_file)
                except ValueError:
                    remove_clear(loaded)
                    raise
            stages.update()
            stages.set_postfix_str(f"saving {out}")
            if out_format == "layers":
                save_clear_layers(loaded, out, base_model=source.to_dict(), overwrite=overwrite)
            else:
                save_converted(loaded, out, base_model=source.to_dict(), overwrite=overwrite,
                               max_shard_size=max_shard_size)
            stages.update()
    except (ValueError, FileExistsError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(report.table())
    typer.echo(f"converted {len(loaded._clear_sites)} joint attention sites to CLEAR (r={radius:g}); wrote {out}")


def _radius_rules(rules: list[str]) -> dict[str, float]:
    parsed = {}
    for rule in rules:
        pattern, sep, value = rule.rpartition("=")
        try:
            parsed[pattern] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise ValueError(f"--radius-for takes PATTERN=RADIUS, got {rule!r}")
    return parsed


@app.command()
def profile(
    model: str = typer.Option(..., "--model", "-m", help="builtin:NAME (whole tiny pipeline), Hub id or pipeline folder"),
    prompt: str = typer.Option("a photo of a cat in a city at night", help="prompt for the denoising run"),
    resolution: int = typer.Option(512, help="image side in pixels"),
    steps: int = typer.Option(4, help="denoising steps"),
    radii: str = typer.Option("2,4,8,16,32", help="radii to measure"),
    keep: float = typer.Option(0.95, help="attention-mass share a recommended radius must keep"),
    queries: int = typer.Option(256, help="sampled image queries per attention call"),
    out: Path = typer.Option(Path("locality"), "--out", "-o", help="folder for locality.json and PNGs"),
):
    """Measure how local a model's attention is (dense run) and recommend a CLEAR radius."""
    from clear_surgery.surgery.profile import profile_pipeline

    _quiet_libraries()
    try:
        pipe, extra = _load_pipeline(model)
        pipe.set_progress_bar_config(desc="denoising")
        results = profile_pipeline(pipe, prompt, resolution, resolution, steps, _numbers(radii, float), keep=keep,
                                   queries_per_call=queries, out=out, **extra)
    except ValueError as err:
        _fail(str(err))
    for r, kept in zip(results["radii"], results["kept_share_mean"]):
        typer.echo(f"r = {r:>5g}: mean attention mass kept (text + window) {kept:.3f}")
    typer.echo(f"recommended radius (keeps >= {keep:g}): {results['recommended_radius']}")
    typer.echo(f"wrote {out}/locality.json, locality_heatmap.png, attention_maps.png")


def _load_pipeline(model: str):
    """A diffusers pipeline for ``model`` and the call kwargs it needs."""
    from clear_surgery.surgery.builtin import BUILTIN_PREFIX, tiny_pipeline

    if model.startswith(BUILTIN_PREFIX):
        pipe = tiny_pipeline(model)
        return pipe, ({"max_sequence_length": 16} if "flux" in model else {})
    import diffusers

    try:
        return diffusers.DiffusionPipeline.from_pretrained(model), {}
    except Exception as err:
        raise ValueError(f"cannot load a pipeline from {model!r}: {type(err).__name__}: {str(err).splitlines()[0]}")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="CLEAR folder or Hub repo, pipeline, or builtin:NAME"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    height: Optional[int] = typer.Option(None, help="default 1024"),
    width: Optional[int] = typer.Option(None, help="default 1024"),
    steps: Optional[int] = typer.Option(None, help="default 28"),
    guidance: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    from_size: Optional[int] = typer.Option(None, help="SDEdit: generate at this size first, then refine"),
    strength: Optional[float] = typer.Option(None, help="SDEdit strength in (0, 1], default 0.7"),
    ntk_factor: Optional[float] = typer.Option(None, help="scale RoPE theta (NTK) for high resolution"),
    proportional_attention: Optional[bool] = typer.Option(None, help="scale = sqrt(log_4608(N) / d)"),
    radius: Optional[float] = typer.Option(None, help="convert a dense model on the fly with this radius"),
    require_clear: Optional[bool] = typer.Option(None, help="refuse a model without CLEAR attention"),
    recipe: Optional[Path] = typer.Option(None, help="TOML recipe with a [generate] table (flags override it)"),
    out: Path = typer.Option(Path("image.png"), "--out", "-o"),
):
    """Generate an image with a CLEAR model in the stock diffusers pipeline (optionally SDEdit from a base size)."""
    from clear_surgery.surgery.generate import GenerateSettings, generate as run, load_pipeline

    _quiet_libraries()
    try:
        flags = dict(prompt=prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
                     from_size=from_size, strength=strength, ntk_factor=ntk_factor,
                     proportional_attention=proportional_attention, require_clear=require_clear)
        if recipe is not None:
            settings = GenerateSettings.from_recipe(recipe, **flags)
        else:
            if prompt is None:
                raise ValueError("--prompt is required (or a --recipe that sets it)")
            settings = GenerateSettings(**{"height": 1024, "width": 1024, **{k: v for k, v in flags.items()
                                                                              if v is not None}})
        pipe = load_pipeline(model, radius)
        image = run(pipe, settings)
    except ValueError as err:
        _fail(str(err))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    typer.echo(f"wrote {out} ({image.width}x{image.height})")


@app.command()
def coverage():
    """Analyze tiny configs of every MMDiT family in the installed diffusers; print the markdown table."""
    from clear_surgery.surgery.coverage import coverage_table

    _quiet_libraries()
    typer.echo(coverage_table())


@app.command()
def distill(
    recipe: Path = typer.Option(..., "--recipe", help="TOML distillation recipe (see recipes/)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: table.key=value (TOML value)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (overrides output.dir)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in the output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an earlier run in the output folder"),
    device: Optional[str] = typer.Option(None, help="default: cuda when available (torchrun: this process's GPU)"),
):
    """Heal a CLEAR model against its dense teacher; writes CLEAR layers to OUT/clear-layers.

    Several GPUs: torchrun --nproc_per_node N -m clear_surgery.surgery.cli distill --recipe R.toml
    """
    from clear_surgery.surgery.distillation import distill as run, load_recipe

    _quiet_libraries()
    overrides = [*set_, *([f"output.dir={json.dumps(str(out))}"] if out else [])]
    try:
        parsed = load_recipe(recipe, overrides)
        result = run(parsed, resume=resume, overwrite=overwrite, device=device)
    except (ValueError, FileExistsError) as err:
        _fail(str(err))
    if result is not None:
        metrics = json.loads((result / "clear_config.json").read_text())["metrics"]
        typer.echo(f"held-out student-teacher MSE: zero-shot {metrics['zero_shot_student_teacher_mse']:.4g} -> "
                   f"distilled {metrics['eval_student_teacher_mse']:.4g}")
        typer.echo(f"wrote {result}")


@app.command("push-to-hub")
def push_to_hub(
    folder: Path = typer.Argument(..., help="a folder written by convert (model or CLEAR layers)"),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hub"),
    private: bool = typer.Option(False, help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if needed)"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: bool = typer.Option(False, help="list what would be uploaded, with sizes, and stop"),
):
    """Validate a CLEAR folder and upload it (token from HF_TOKEN or `hf auth login`, never printed)."""
    from clear_surgery.hub.push import push_to_hub as push

    _quiet_libraries()
    try:
        result = push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      dry_run=dry_run)
    except Exception as err:  # one line; huggingface_hub's messages carry no token
        _fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if dry_run:
        typer.echo(result.describe())
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        typer.echo(f"uploaded {folder} to {repo_id}" + (f": {result.commit_url}" if result is not None else ""))


def _numbers(text: str, cast=int) -> list:
    return [cast(x) for x in text.split(",") if x]


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="folder for JSON and PNG"),
    sizes: str = typer.Option("1024,2048,4096,8192", help="image sides in pixels (16 px per token)"),
    radii: str = typer.Option("8,16,32", help="CLEAR radii"),
    backends: str = typer.Option("dense-cudnn,dense-flash,flex-raster,flex-tiled,triton-tiled",
                                 help="attention backends to time"),
    step: bool = typer.Option(True, help="also time a FLUX.1-dev-shaped transformer step"),
    step_sizes: str = typer.Option("1024,2048,4096,8192", help="image sides for the step"),
    step_radius: float = typer.Option(16, help="radius for the step"),
    dense_step_max: int = typer.Option(8192, help="largest size at which the dense step is timed"),
    device: str = typer.Option("cuda", help="cuda (cpu only for smoke tests at tiny sizes)"),
    heads: int = typer.Option(24), head_dim: int = typer.Option(128), text: int = typer.Option(512),
):
    """Time one attention layer (dense, flex, triton) and a FLUX-shaped step; write JSON + PNG."""
    import json

    from clear_surgery.surgery import bench as b

    _quiet_libraries()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch_device_name(device), "torch": _torch_version()}
    rows = b.bench_attention(_numbers(sizes), _numbers(radii, float), backends.split(","), heads=heads,
                             head_dim=head_dim, text=text, device=device)
    (out / "attention.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    typer.echo(_attention_table(rows))
    step_rows = []
    if step:
        step_rows = b.bench_step(_numbers(step_sizes), step_radius, dense_max=dense_step_max, device=device)
        (out / "step.json").write_text(json.dumps({**meta, "rows": step_rows}, indent=1) + "\n")
    b.plot(rows, step_rows, out / "bench.png")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
