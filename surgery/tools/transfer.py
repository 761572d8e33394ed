"""``check-transfer``: do CLEAR layers carry over to another model of their architecture (trained on
FLUX.1-dev, used on FLUX.1-schnell or inside a ControlNet pipeline)? The target pipeline makes each
image twice, with the same prompt, seed and condition: dense, then with CLEAR attention (the layers'
tensors in place, or zero-shot at ``radius`` when no layers are given). One model in memory: the
dense images are made first and the target is converted in place afterwards.

The report folder holds metrics.json, report.md, grid.png (original | CLEAR | difference) and the
images themselves. A ``dense_cache`` folder keeps the dense images (and final latents) so that the next check
of the same target with the same prompts, seeds, conditions and settings skips them: a study of several
layer sets or radii makes the dense images once."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clear_surgery.hub import resolve_model
from clear_surgery.hub.resolve import ModelRef
from clear_surgery.hub.atomic import atomic_directory, write_json, write_text
from clear_surgery.hub.clear_layers import (LayersSource, apply_layer_deltas, apply_layer_tensors, check_layer_fit,
                                            layer_shapes, resolve_layers)
from clear_surgery.surgery import ClearConfig, apply_clear, family_of
from clear_surgery.surgery.core.checks import check_number
from clear_surgery.surgery.core.errors import InvalidValueError, MismatchError

from . import image_metrics
from .arguments import check_layers_mode
from .controlnets import controlnet_pipeline, load_controlnet, read_control_images
from .convert import base_tensors, layers_base_ref
from .pipeline import load_pipeline
from .quantize import check_quantize, quantize_pipeline

REPORT_FILES = ("metrics.json", "report.md", "grid.png")
# a ControlNet's own attention: dense; CLEAR zero-shot; CLEAR plus the layers' changes on the blocks it
# shares with the target (a FLUX ControlNet starts as a copy of the first blocks); CLEAR with its own trained
# tensors (--controlnet-layers: what `distill` writes when the ControlNet's attention trains with the model's)
CONTROLNET_ATTENTION = ("dense", "clear", "layers", "trained")
DIFF_GAIN = 4  # the difference column shows |original - CLEAR| x 4


class TransferError(MismatchError):
    pass


@dataclass
class TransferSettings:
    prompts: list[str]
    num_images: int = 4
    seed: int = 0
    steps: int | None = None  # None: the pipeline's default
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    condition: str = "gray"  # how a ControlNet's condition is recomputed from an output
    controlnet_scale: float = 1.0

    def __post_init__(self):
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InvalidValueError("the prompt list is empty or holds an empty prompt")
        for name in ("num_images", "steps", "height", "width"):
            check_number(name.replace("_", "-"), getattr(self, name), integer=True, low=1, strict=False,
                         optional=name != "num_images")
        check_number("seed", self.seed, integer=True, low=0, strict=False)
        for name in ("guidance", "controlnet_scale"):
            check_number(name.replace("_", "-"), getattr(self, name), low=0, strict=False,
                         optional=name == "guidance")
        if self.condition not in image_metrics.CONDITIONS:
            raise InvalidValueError(f"condition must be one of {image_metrics.CONDITIONS}, got {self.condition!r}")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InvalidValueError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise InvalidValueError(f"prompt file {path} holds no prompt")
    return prompts


def _layers_base_tensors(layers: LayersSource | None, base: ModelRef) -> dict:
    """The original values, in the model the layers were made from, of the tensors the layers hold."""
    return base_tensors(base, list(layer_shapes(layers.file)))


# --- generation ----------------------------------------------------------------------------------

def _generate(pipe, s: TransferSettings, controls, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, H, W) in [0, 1], final latents (N, ...)) for every prompt/seed/condition."""
    from tqdm.auto import tqdm

    images, latents = [], []
    common = family_of(pipe.transformer).call_kwargs(pipe)
    for i in tqdm(range(s.num_images), desc=progress, unit="image", disable=progress is None):
        captured = {}

        def keep_latents(_pipe, step, timestep, tensors):
            captured["latents"] = tensors["latents"].detach().float().cpu()
            return {}

        kwargs = dict(prompt=s.prompts[i % len(s.prompts)], generator=torch.Generator().manual_seed(s.seed + i),
                      output_type="pt", callback_on_step_end=keep_latents,
                      callback_on_step_end_tensor_inputs=["latents"], **common)
        kwargs.update({k: v for k, v in (("num_inference_steps", s.steps), ("guidance_scale", s.guidance),
                                         ("height", s.height), ("width", s.width)) if v is not None})
        if controls is not None:
            kwargs.update(control_image=controls[i % len(controls)], controlnet_conditioning_scale=s.controlnet_scale)
        with torch.no_grad():
            images.append(pipe(**kwargs).images[0].float().cpu().clamp(0, 1))
        latents.append(captured["latents"][0])
    return torch.stack(images), torch.stack(latents)


def _condition_errors(images: torch.Tensor, controls: list, kind: str) -> dict:
    """MSE and PSNR between the condition recomputed from each image and the control image given."""
    import numpy as np

    h, w = images.shape[-2:]
    given = torch.stack([torch.from_numpy(np.array(controls[i % len(controls)].resize((w, h), resample=3)))
                         .permute(2, 0, 1).float() / 255 for i in range(len(images))])
    target = image_metrics.condition_of(given, "gray")  # the control image is the condition map itself
    recomputed = image_metrics.condition_of(images, kind)
    mse = (recomputed - target).pow(2).flatten(1).mean(1)
    return {"mse": mse.tolist(), "psnr": image_metrics.psnr(recomputed, target)}


def _mean(values) -> float:
    values = list(values)
    return math.inf if any(v == math.inf for v in values) else sum(values) / len(values)


# --- the dense images, kept for the next check -------------------------------------------------------

def _fingerprint(source) -> object:
    """A model argument as the cache key sees it: a local folder by its files' names, sizes and times (a
    retrained model in the same place is a different model); anything else (Hub id, built-in) as given."""
    if source is None or not Path(source).exists():
        return source
    folder = Path(source).resolve()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return [str(folder), [(str(p.relative_to(folder) if p != folder else p.name), p.stat().st_size,
                           p.stat().st_mtime_ns) for p in files]]


def _dense_key(ref: ModelRef, controlnet, controls, settings: TransferSettings, device: str) -> str:
    """What the dense images depend on, hashed: target, ControlNet, condition pixels, settings, device, torch."""
    import hashlib
    import json

    condition_hash = hashlib.sha256()
    for image in controls or ():
        condition_hash.update(f"{image.size}".encode() + image.tobytes())
    key = {"target": _fingerprint(ref.pipeline or ref.folder) or ref.source, "subfolder": ref.subfolder,
           "revision": ref.revision, "controlnet": _fingerprint(controlnet),
           "conditions": condition_hash.hexdigest() if controls else None,
           "settings": dataclasses.asdict(settings), "device": str(device), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_dense(cache: Path, key: str):
    from safetensors.torch import load_file

    path = cache / f"dense-{key}.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return tensors["images"], tensors["latents"]


def _save_dense(cache: Path, key: str, images: torch.Tensor, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"dense-{key}.safetensors"
    # renamed when whole, one name per process: a killed run leaves no bad entry, two checks at once no mix
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    save_file({"images": images.contiguous(), "latents": latents.contiguous()}, str(partial))
    partial.replace(path)


# --- the check ------------------------------------------------------------------------------------

def check_transfer(target: str, out: str | Path, settings: TransferSettings, *, clear_layers: str | Path | None = None,
                   radius: float | None = None, controlnet: str | None = None, control_images=None,
                   layers_mode: str = "replace", layers_base: str | None = None, controlnet_attention: str = "clear",
                   controlnet_layers: str | Path | None = None,
                   allow_radius_change: bool = False, overwrite: bool = False, progress: bool = True,
                   device: str = "cpu", quantize: str | None = None,
                   dense_cache: str | Path | None = None) -> dict:
    """Generate with the dense target and with CLEAR (``clear_layers``' tensors, or zero-shot at
    ``radius``), compare, and write the report folder ``out``. Returns the metrics.

    ``layers_mode`` replace: the target's attention tensors become the layers' (right for the model
    the layers were made from); delta: the target's own tensors plus what the layers changed in
    their base model (``layers_base``, default the base their folder records) -- for a relative
    whose attention weights moved in its own training (schnell from dev). ``device``: where the pipelines run.
    ``quantize`` ("fp8"): the CLEAR side's linear layers in FP8 (the dense side stays as stored).
    ``dense_cache``: a folder where the dense images are kept and looked up (see the module's docstring)."""
    check_quantize("quantize", quantize, device)
    if clear_layers is None and radius is None:
        raise InvalidValueError("give --clear-layers (trained CLEAR layers) or --radius (zero-shot CLEAR)")
    check_layers_mode(layers_mode, clear_layers)
    if controlnet_attention not in CONTROLNET_ATTENTION:
        raise InvalidValueError(f"controlnet attention must be one of {CONTROLNET_ATTENTION}, got "
                                f"{controlnet_attention!r}")
    if controlnet_attention == "layers" and clear_layers is None:
        raise InvalidValueError("--controlnet-attention layers needs --clear-layers")
    if (controlnet_attention == "trained") != (controlnet_layers is not None):
        raise InvalidValueError("--controlnet-layers and --controlnet-attention trained go together")
    if (controlnet is None) != (control_images is None):
        raise InvalidValueError("--controlnet and --control-images go together")
    if controlnet_layers is not None and controlnet is None:
        raise InvalidValueError("--controlnet-layers needs --controlnet")
    controls = read_control_images(control_images) if control_images is not None else None  # before any model
    layers: LayersSource | None = resolve_layers(clear_layers) if clear_layers is not None else None
    controlnet_own = resolve_layers(controlnet_layers) if controlnet_layers is not None else None
    radius = radius if radius is not None else layers.radius
    config = ClearConfig(radius=radius, down_factor=layers.down_factor if layers is not None else None)

    ref = resolve_model(target)
    if ref.is_clear:
        raise TransferError(f"--target {target} is {ref.describe()}: give the dense model the layers should work on")
    pipe = load_pipeline(ref)
    transformer = pipe.transformer
    if layers is not None:  # every mismatch is found before the first image is made
        layers.check_target(type(transformer).__name__, radius, allow_radius_change=allow_radius_change,
                            down_factor=config.down_factor)
        check_layer_fit({n: tuple(t.shape) for n, t in transformer.state_dict().items()}, layers.file,
                        f"the target's {type(transformer).__name__}", before_rewrite=True)
    delta_base = layers_base_ref(layers, layers_base) if layers_mode == "delta" else None
    base_values = _layers_base_tensors(layers, delta_base) if delta_base is not None else None
    if controlnet_attention == "layers" and base_values is None:  # replace: the target is the layers' base
        state = transformer.state_dict()
        base_values_cn = {n: state[n].detach().clone() for n in layer_shapes(layers.file) if n in state}
    else:
        base_values_cn = base_values
    if controlnet is not None:
        pipe = controlnet_pipeline(pipe, load_controlnet(controlnet, transformer))
        cn_state = pipe.controlnet.state_dict()
        if controlnet_attention == "layers" and not any(
                n in cn_state and tuple(cn_state[n].shape) == shape for n, shape in layer_shapes(layers.file).items()):
            raise TransferError(f"the ControlNet shares no tensor with the layers {layers.describe()}: use "
                                "--controlnet-attention clear or dense")
        if controlnet_own is not None:
            controlnet_own.check_target(type(pipe.controlnet).__name__, radius,
                                        allow_radius_change=allow_radius_change, down_factor=config.down_factor)
            check_layer_fit({n: tuple(t.shape) for n, t in cn_state.items()}, controlnet_own.file,
                            f"the ControlNet's {type(pipe.controlnet).__name__}", before_rewrite=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    with atomic_directory(out, overwrite) as tmp:
        key = _dense_key(ref, controlnet, controls, settings, device) if dense_cache is not None else None
        cached = _load_dense(Path(dense_cache), key) if key else None
        if cached is not None:
            original, original_latents = cached
        else:
            original, original_latents = _generate(pipe, settings, controls, "dense" if progress else None)
            if key:
                _save_dense(Path(dense_cache), key, original, original_latents)
        apply_clear(transformer, config)
        if base_values is not None:
            apply_layer_deltas(transformer, layers.file, base_values)
        elif layers is not None:
            apply_layer_tensors(transformer, layers.file)
        if controlnet is not None and controlnet_attention != "dense":
            apply_clear(pipe.controlnet, config)
            if controlnet_attention == "layers":
                apply_layer_deltas(pipe.controlnet, layers.file, base_values_cn, shared_only=True)
            elif controlnet_own is not None:
                apply_layer_tensors(pipe.controlnet, controlnet_own.file)
        quantize_pipeline(pipe, quantize)
        clear, clear_latents = _generate(pipe, settings, controls, "CLEAR" if progress else None)
        metrics = _metrics(original, clear, original_latents, clear_latents, settings, controls)
        metrics["setup"] = {
            "target": str(target), "target_class": type(transformer).__name__,
            "clear_layers": str(layers.describe()) if layers else None, "radius": radius,
            "mode": ("trained CLEAR layers" + (" (delta)" if base_values is not None else "")) if layers
            else "zero-shot", "layers_base": delta_base.source if delta_base is not None else None, "controlnet": controlnet,
            "controlnet_attention": controlnet_attention if controlnet else None, "quantize": quantize,
            "controlnet_layers": controlnet_own.describe() if controlnet_own else None,
            "control_images": str(control_images) if control_images else None,
            "dense_images": "from the dense cache" if cached is not None else "made in this run",
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "prompts"},
            "prompts": [settings.prompts[i % len(settings.prompts)] for i in range(settings.num_images)]}
        _write_report(Path(tmp), metrics, original, clear)
    return metrics


def _metrics(original, clear, original_latents, clear_latents, s: TransferSettings, controls) -> dict:
    per_image = {"psnr": image_metrics.psnr(original, clear), "ssim": image_metrics.ssim(original, clear),
                 "latent_mse": (original_latents - clear_latents).pow(2).flatten(1).mean(1).tolist()}
    learned = image_metrics.LearnedMetrics()
    per_image.update(learned.compute(original, clear))
    summary = {k: _mean(v) for k, v in per_image.items() if isinstance(v, list)}
    summary.update({k: v for k, v in per_image.items() if not isinstance(v, list)})
    result = {"summary": summary, "per_image": per_image, "learned_metrics_missing": learned.missing}
    if controls is not None:
        cond = {"original": _condition_errors(original, controls, s.condition),
                "clear": _condition_errors(clear, controls, s.condition)}
        result["condition_error"] = {"kind": s.condition, **cond}
        for who in ("original", "clear"):
            summary[f"condition_mse_{who}"] = _mean(cond[who]["mse"])
            summary[f"condition_psnr_{who}"] = _mean(cond[who]["psnr"])
    return result


def _fmt(value) -> str:
    return "inf" if value == math.inf else f"{value:.4g}"


def _write_report(folder: Path, metrics: dict, original: torch.Tensor, clear: torch.Tensor) -> None:
    setup = metrics["setup"]
    lines = [f"# CLEAR transfer check: {setup['target']}", "",
             f"{setup['mode']} (r = {setup['radius']:g}" + (f", layers {setup['clear_layers']}" if setup["clear_layers"]
                                                            else "") + f"), {setup['num_images']} images, seed "
             f"{setup['seed']}" + (f", ControlNet {setup['controlnet']} ({setup['controlnet_attention']} attention)"
                                   if setup["controlnet"] else ""), "",
             "| metric | mean |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics["summary"].items()]
    if metrics["learned_metrics_missing"]:
        lines += ["", "Not computed (weights not on this machine):", ""]
        lines += [f"- {k}: {v}" for k, v in metrics["learned_metrics_missing"].items()]
    lines += ["", "grid.png: original | CLEAR | difference x4, one row per image.", ""]
    write_json(folder / "metrics.json", metrics)
    write_text(folder / "report.md", "\n".join(lines))
    _write_images(folder, original, clear)


def _write_images(folder: Path, original: torch.Tensor, clear: torch.Tensor) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    def u8(x):
        return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    (folder / "images").mkdir()
    rows = []
    for i, (a, b) in enumerate(zip(original, clear)):
        Image.fromarray(u8(a)).save(folder / "images" / f"{i:03d}-original.png")
        Image.fromarray(u8(b)).save(folder / "images" / f"{i:03d}-clear.png")
        rows.append(np.concatenate([u8(a), u8(b), u8(((a - b).abs() * DIFF_GAIN))], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, 256 // original.shape[-1])  # small images drawn larger, pixels kept sharp
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.NEAREST)
    header = Image.new("RGB", (grid.width, 16), "white")
    draw = ImageDraw.Draw(header)
    for col, title in enumerate(("original", "CLEAR", f"|difference| x{DIFF_GAIN}")):
        draw.text((col * grid.width // 3 + 4, 2), title, fill="black")
    canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(grid, (0, 16))
    canvas.save(folder / "grid.png")
