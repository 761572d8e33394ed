"""Ultra-resolution generation with a CLEAR model in the stock diffusers pipelines: text-to-image,
optionally SDEdit from a base size (generate small, upscale, img2img at the target size), NTK-scaled
RoPE and proportional attention, VAE tiling for large sizes, progress per stage."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, replace

import torch

from clear_surgery.surgery import family_of, get_clear_state
from clear_surgery.surgery.core.checks import check_number
from clear_surgery.surgery.core.errors import InvalidValueError

from .arguments import read_toml

from .pipeline import load_pipeline

__all__ = ["GenerateError", "GenerateSettings", "check_settings", "generate", "load_pipeline", "size_multiple"]


class GenerateError(InvalidValueError):
    pass


@dataclass
class GenerateSettings:
    prompt: str
    height: int
    width: int
    steps: int = 28
    guidance: float | None = None
    seed: int = 0
    from_size: int | None = None
    strength: float = 0.7
    ntk_factor: float | None = None
    proportional_attention: bool = False
    require_clear: bool = False
    base_steps: int | None = None  # SDEdit base stage (default: steps)
    base_guidance: float | None = None  # SDEdit base stage (default: guidance)
    refine_shift: float | None = None  # SDEdit refine stage: static scheduler shift (no dynamic shifting)

    def __post_init__(self):
        """Everything that does not depend on the pipeline (sizes' multiple does: ``check_settings``)."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise GenerateError(f"prompt must be a non-empty string, got {self.prompt!r}")
        for name, low, integer in (("height", 1, True), ("width", 1, True), ("steps", 1, True), ("seed", 0, True),
                                   ("from_size", 1, True), ("base_steps", 1, True), ("guidance", 0, False),
                                   ("base_guidance", 0, False)):
            check_number(name.replace("_", "-"), getattr(self, name), integer=integer, low=low, strict=False,
                         optional=name not in ("height", "width", "steps", "seed"), error=GenerateError)
        check_number("strength", self.strength, low=0, high=1, error=GenerateError)
        for name in ("ntk_factor", "refine_shift"):
            check_number(name.replace("_", "-"), getattr(self, name), low=0, optional=True, error=GenerateError)

    @classmethod
    def from_recipe(cls, path, **overrides) -> "GenerateSettings":
        """Settings from a TOML recipe's [generate] table, then ``overrides`` (None values ignored)."""
        table = read_toml(path, error=GenerateError).get("generate", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise GenerateError(f"{path}: unknown [generate] keys {unknown}; known: {sorted(known)}")
        values = {**table, **{k: v for k, v in overrides.items() if v is not None}}
        missing = [k for k in ("prompt", "height", "width") if k not in values]
        if missing:
            raise GenerateError(f"{path}: {missing} not given by the recipe or the command line")
        return cls(**values)


def size_multiple(pipe) -> int:
    """Image sizes must be multiples of this: VAE downsampling times latent pixels per token side."""
    family = family_of(pipe.transformer)
    patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
    return pipe.vae_scale_factor * (family.latent_packing if family.latent_packing > 1 else patch)


def check_settings(pipe, s: GenerateSettings) -> None:
    multiple = size_multiple(pipe)
    for name, value in (("height", s.height), ("width", s.width), ("from-size", s.from_size)):
        if value is not None and (value <= 0 or value % multiple):
            raise GenerateError(f"{name} {value} is not a positive multiple of {multiple} (this pipeline's size step)")
    if s.require_clear and get_clear_state(pipe.transformer) is None:
        raise GenerateError(f"{type(pipe.transformer).__name__} has no CLEAR attention (--require-clear)")


@contextlib.contextmanager
def _high_resolution(pipe, s: GenerateSettings):
    """NTK-scaled RoPE (FLUX: theta * factor) and proportional attention, for the call only."""
    pos = getattr(pipe.transformer, "pos_embed", None)
    theta = getattr(pos, "theta", None)
    state = get_clear_state(pipe.transformer)
    runtime = state.runtime if state is not None else None
    if s.ntk_factor and theta is None:
        raise GenerateError(f"--ntk-factor needs a RoPE model; {type(pipe.transformer).__name__} has none")
    if s.proportional_attention and runtime is None:
        raise GenerateError("--proportional-attention needs a CLEAR model")
    try:
        if s.ntk_factor:
            pos.theta = theta * s.ntk_factor
        with runtime.routed("proportional-attention", proportional_attention) if s.proportional_attention else \
                contextlib.nullcontext():
            yield
    finally:
        if theta is not None:
            pos.theta = theta


def proportional_attention(call, proceed):
    """The official high-resolution setting, a step of the attention route: scale = sqrt(log_4608(tokens) /
    head_dim), tokens of the whole sequence (4608 = the tokens of a 1024² FLUX image with its text)."""
    return proceed(replace(call, scale=math.sqrt(math.log(call.tokens(), 4608) / call.query.shape[-1])))


def _call_kwargs(pipe, s: GenerateSettings, height, width) -> dict:
    kwargs = dict(prompt=s.prompt, height=height, width=width, num_inference_steps=s.steps,
                  generator=torch.Generator().manual_seed(s.seed))
    if s.guidance is not None:
        kwargs["guidance_scale"] = s.guidance
    return {**kwargs, **family_of(pipe.transformer).call_kwargs(pipe)}


def _base_size(s: GenerateSettings, multiple: int) -> tuple[int, int]:
    scale = s.from_size / max(s.height, s.width)
    return (max(multiple, round(s.height * scale / multiple) * multiple),
            max(multiple, round(s.width * scale / multiple) * multiple))


def generate(pipe, s: GenerateSettings, *, progress=None):
    """Returns a PIL image of s.width x s.height."""
    from tqdm.auto import tqdm

    check_settings(pipe, s)
    if max(s.height, s.width) > 2048 and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()  # decode 4K-8K within memory
    stages = tqdm(total=2 if s.from_size else 1, desc="generate", unit="stage", disable=progress is False)
    with _high_resolution(pipe, s):
        if not s.from_size:
            image = pipe(**_call_kwargs(pipe, s, s.height, s.width)).images[0]
            stages.update()
        else:
            import diffusers

            height, width = _base_size(s, size_multiple(pipe))
            stages.set_postfix_str(f"base {height}x{width}")
            base_settings = dataclasses.replace(s, steps=s.base_steps or s.steps,
                                                guidance=s.guidance if s.base_guidance is None else s.base_guidance)
            base = pipe(**_call_kwargs(pipe, base_settings, height, width)).images[0]
            stages.update()
            stages.set_postfix_str(f"SDEdit {s.height}x{s.width}, strength {s.strength:g}")
            refine = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
            if s.refine_shift is not None:
                refine.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                    shift=s.refine_shift)
            upscaled = base.resize((s.width, s.height), resample=3)  # bicubic
            image = refine(image=upscaled, strength=s.strength, **_call_kwargs(pipe, s, s.height, s.width)).images[0]
            stages.update()
    stages.close()
    return image
