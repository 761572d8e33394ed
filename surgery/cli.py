"""The ``clear-surgery`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from tqdm.auto import tqdm

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Linearize diffusion transformers with CLEAR local attention.")

MODEL_HELP = ("builtin:NAME, a local diffusers model or pipeline folder, a converted CLEAR folder, a CLEAR-layers "
              "folder, or a Hub id of any of these")
# what bad input or a bad environment raises (RuntimeError: a model the rewrite's check or torch refuses)
USER_ERRORS = (ValueError, FileExistsError, OSError, RuntimeError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors():
    """One ``error: ...`` line and exit code 2 for errors the user's input or machine causes."""
    try:
        yield
    except USER_ERRORS as err:
        text = str(err) if not isinstance(err, OSError) or not err.strerror else \
            f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        _fail(text)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    warnings.filterwarnings("ignore", category=FutureWarning)


def _resolve(model: str, subfolder=None, revision=None):
    from clear_surgery.hub import resolve_model

    return resolve_model(model, subfolder=subfolder, revision=revision)


@app.command()
def analyze(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    subfolder: Optional[str] = typer.Option(None, help="model subfolder (default: transformer for pipelines)"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
):
    """List every attention site of a model: owner, kind, segment order, token counts, rewritable or why not."""
    from clear_surgery.hub import load_model
    from clear_surgery.surgery import analyze as run_analysis

    _quiet_libraries()
    with user_errors():
        if json_out is not None and not json_out.parent.is_dir():
            raise ValueError(f"--json: folder {json_out.parent} does not exist")
        loaded, _ = load_model(_resolve(model, subfolder, revision))
        report = run_analysis(loaded)
        typer.echo(report.table())
        if json_out:
            json_out.write_text(report.to_json() + "\n")
            typer.echo(f"wrote {json_out}")


@app.command()
def convert(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    radius: Optional[float] = typer.Option(None, "--radius", "-r",
                                           help="CLEAR radius in tokens (strict: d < r); default: from the "
                                                "--clear-layers file name or the CLEAR folder given"),
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
    max_shard_size: str = typer.Option("10GB", help="largest safetensors shard of a model saved from memory "
                                                    "(models read from files keep their shards)"),
    link: bool = typer.Option(True, help="hard-link the files a conversion leaves unchanged (where the filesystem "
                                         "allows) instead of copying them"),
):
    """Convert a model's joint attention to CLEAR and save it as a loadable folder."""
    from clear_surgery.hub import parse_dtype, resolve_file
    from clear_surgery.surgery import ClearConfig
    from clear_surgery.surgery.tools.convert import convert as run, default_radius

    _quiet_libraries()
    with user_errors():
        if out_format not in ("full", "layers"):
            raise ValueError(f"--format must be full or layers, got {out_format!r}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
        torch_dtype = parse_dtype(dtype)
        rules = _radius_rules(radius_for)
        with tqdm(total=3, desc="convert", unit="stage", file=sys.stderr) as stages:
            stages.set_postfix_str(f"resolving {model}")
            ref = _resolve(model, subfolder, revision)
            layers_file = resolve_file(clear_layers, revision) if clear_layers else None
            if radius is None:
                radius = default_radius(ref, layers_file)
            config = ClearConfig(radius=radius, backend=backend, target_modules=target or None,
                                 exclude_modules=exclude, token_layout=token_layout, radius_overrides=rules)
            stages.update()
            stages.set_postfix_str("analyze, rewrite, verify, write")
            result = run(ref, out, config, dtype=torch_dtype, clear_layers=layers_file, out_format=out_format,
                         overwrite=overwrite, max_shard_size=max_shard_size, link=link)
            stages.update(2)
    typer.echo(result.analysis.table())
    how = (f"; shards: {result.linked} linked, {result.copied} copied, {result.rewritten} rewritten"
           if result.streamed and out_format == "full" else "")
    typer.echo(f"converted {len(result.sites)} joint attention sites to CLEAR (r={radius:g}); wrote {out}{how}")


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
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + " (with a pipeline around it)"),
    prompt: str = typer.Option("a photo of a cat in a city at night", help="prompt for the denoising run"),
    resolution: int = typer.Option(512, help="image side in pixels"),
    steps: int = typer.Option(4, help="denoising steps"),
    radii: str = typer.Option("2,4,8,16,32", help="radii to measure"),
    keep: float = typer.Option(0.95, help="attention-mass share a recommended radius must keep"),
    queries: int = typer.Option(256, help="sampled image queries per attention call"),
    out: Path = typer.Option(Path("locality"), "--out", "-o", help="folder for locality.json and PNGs"),
):
    """Measure how local a model's attention is (dense run) and recommend a CLEAR radius.
    A CLEAR folder is measured with its weights and dense attention."""
    from clear_surgery.surgery import family_of, get_clear_state, remove_clear
    from clear_surgery.surgery.tools.pipeline import load_pipeline
    from clear_surgery.surgery.tools.profile import profile_pipeline

    _quiet_libraries()
    with user_errors():
        pipe = load_pipeline(_resolve(model))
        if get_clear_state(pipe.transformer) is not None:
            remove_clear(pipe.transformer)
        pipe.set_progress_bar_config(desc="denoising")
        results = profile_pipeline(pipe, prompt, resolution, resolution, steps, _numbers(radii, float), keep=keep,
                                   queries_per_call=queries, out=out, **family_of(pipe.transformer).call_kwargs(pipe))
    for r, kept in zip(results["radii"], results["kept_share_mean"]):
        typer.echo(f"r = {r:>5g}: mean attention mass kept (text + window) {kept:.3f}")
    typer.echo(f"recommended radius (keeps >= {keep:g}): {results['recommended_radius']}")
    typer.echo(f"wrote {out}/locality.json, locality_heatmap.png, attention_maps.png")


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP + " (with a pipeline around it)"),
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
    from clear_surgery.surgery.tools.generate import GenerateSettings, generate as run
    from clear_surgery.surgery.tools.pipeline import load_pipeline

    _quiet_libraries()
    with user_errors():
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
        pipe = load_pipeline(_resolve(model), radius)
        image = run(pipe, settings)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
    typer.echo(f"wrote {out} ({image.width}x{image.height})")


@app.command()
def coverage():
    """Analyze tiny configs of every MMDiT family in the installed diffusers; print the markdown table."""
    from clear_surgery.surgery.tools.coverage import coverage_table

    _quiet_libraries()
    typer.echo(coverage_table())


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
    from clear_surgery.hub import read_clear_config
    from clear_surgery.surgery.tools.distillation import distill as run, load_recipe

    _quiet_libraries()
    overrides = [*([f"model.teacher={json.dumps(model)}"] if model else []), *set_,
                 *([f"output.dir={json.dumps(str(out))}"] if out else [])]
    with user_errors():
        parsed = load_recipe(recipe, overrides)
        result = run(parsed, resume=resume, overwrite=overwrite, device=device)
    if result is not None:
        metrics = read_clear_config(result, None)["training"]["metrics"]
        typer.echo(f"held-out student-teacher MSE: zero-shot {metrics['zero_shot_student_teacher_mse']:.4g} -> "
                   f"distilled {metrics['eval_student_teacher_mse']:.4g}")
        typer.echo(f"wrote {result}")


@app.command("push-to-hub")
def push_to_hub(
    model: str = typer.Argument(..., help="a CLEAR folder (converted model or CLEAR layers), local or on the Hub"),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hub"),
    private: bool = typer.Option(False, help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if needed)"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: bool = typer.Option(False, help="list what would be uploaded, with sizes, and stop"),
):
    """Validate a CLEAR folder and upload it (token from HF_TOKEN or `hf auth login`, never printed)."""
    from clear_surgery.hub.push import push_to_hub as push

    _quiet_libraries()
    with user_errors():
        ref = _resolve(model)
        if not ref.is_clear:
            raise ValueError(f"{model} is {ref.describe()}: push-to-hub uploads a CLEAR folder (run clear-surgery "
                             "convert first)")
    try:
        result = push(ref.folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      dry_run=dry_run)
    except Exception as err:  # one line; huggingface_hub's messages carry no token
        _fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if dry_run:
        typer.echo(result.describe())
        typer.echo(f"dry run: nothing uploaded to {repo_id}")
    else:
        typer.echo(f"uploaded {model} to {repo_id}" + (f": {result.commit_url}" if result is not None else ""))


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help="a converted CLEAR model: " + MODEL_HELP),
    out_format: str = typer.Option(..., "--format", "-f", help="onnx | tensorrt | aoti"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    min_size: str = typer.Option("512x512", help="smallest image served, HEIGHTxWIDTH in pixels"),
    opt_size: str = typer.Option("1024x1024", help="the size engines are tuned for (and traced at)"),
    max_size: str = typer.Option("2048x2048", help="largest image served"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: as stored)"),
    batch: int = typer.Option(1, help="batch size of the exported model"),
    text_len: Optional[int] = typer.Option(None, help="text tokens (default: the family's, e.g. 512 for FLUX.1)"),
    timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache to start from"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
):
    """Export a converted model for deployment: ONNX with ClearAttention nodes, a TensorRT engine running
    the CLEAR plugin, or an AOTInductor package."""
    from clear_surgery.export import export_model

    _quiet_libraries()
    with user_errors(), tqdm(total=None, desc="export", unit="stage", file=sys.stderr) as stages:
        def progress(message):
            stages.set_postfix_str(message)
            stages.update()

        data = export_model(model, out, out_format, sizes={"min": min_size, "opt": opt_size, "max": max_size},
                            dtype=dtype, batch=batch, text_len=text_len, overwrite=overwrite,
                            timing_cache=timing_cache, progress=progress)
    sizes = data["sizes"]
    typer.echo(f"exported {data['model_class']} ({len(data['sites'])} CLEAR sites, r={data['clear_config']['radius']:g}) "
               f"as {out_format} for {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]} px, "
               f"{data['dtype']}; wrote {out}: {', '.join(data['files'])}")


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

    from clear_surgery.surgery.tools import bench as b

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
