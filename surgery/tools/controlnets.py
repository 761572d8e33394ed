"""ControlNets beside a transformer, as ``check-transfer`` and ``distill --controlnet`` use them: does one fit,
loading it, the pipeline that runs both, and the condition images."""

from __future__ import annotations

from pathlib import Path

from clear_surgery.hub import load_model, resolve_model
from clear_surgery.surgery import family_for_class, family_of, is_controlnet
from clear_surgery.surgery.core.errors import FileFormatError, InvalidValueError, MismatchError


class ControlNetError(MismatchError):
    pass


def controlnet_problems(transformer, controlnet) -> list[str]:
    """What keeps ``controlnet`` from feeding ``transformer``'s blocks (empty when it fits)."""
    t, c = transformer.config, controlnet.config
    problems = []
    if family_for_class(type(controlnet).__name__) is not family_of(transformer):
        return [f"a {type(controlnet).__name__} does not drive a {type(transformer).__name__}"]
    for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope"):
        theirs, ours = (list(v) if isinstance(v, (list, tuple)) else v for v in (c.get(key), t.get(key)))
        if key in t and key in c and theirs != ours:
            problems.append(f"{key}: ControlNet {c[key]}, target {t[key]}")
    inner = lambda cfg: cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)  # noqa: E731
    if inner(t) != inner(c):
        problems.append(f"hidden size: ControlNet {inner(c)}, target {inner(t)}")
    return problems


def load_controlnet(source: str, transformer, option: str = "--controlnet"):
    """The ControlNet ``source`` in the transformer's dtype; one clear error when it is none or does not fit."""
    ref = resolve_model(source)
    if not is_controlnet(ref.model_class):
        raise ControlNetError(f"{option} {source} is {ref.describe()}, not a ControlNet")
    controlnet, _ = load_model(ref, dtype=transformer.dtype)
    problems = controlnet_problems(transformer, controlnet)
    if problems:
        raise ControlNetError(f"ControlNet {source} does not fit the target's {type(transformer).__name__}: "
                              + "; ".join(problems))
    return controlnet


def controlnet_pipeline(pipe, controlnet):
    """The family's ControlNet pipeline sharing ``pipe``'s components."""
    import diffusers

    name = family_of(pipe.transformer).pipelines.get(type(controlnet).__name__)
    if name is None or not hasattr(diffusers, name):
        raise ControlNetError(f"no diffusers pipeline runs a {type(controlnet).__name__}")
    return getattr(diffusers, name).from_pipe(pipe, controlnet=controlnet)


def read_control_images(source: str | Path) -> list:
    """A folder of images (sorted by name) or one image file, as RGB PIL images."""
    from PIL import Image, UnidentifiedImageError

    source = Path(source)
    suffixes = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in suffixes) if source.is_dir() else [source]
    if not source.exists() or not files:
        raise InvalidValueError(f"control images: {source} is not an image file or a folder holding images")
    images = []
    for file in files:
        try:
            images.append(Image.open(file).convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise FileFormatError(f"control image {file} cannot be read: {err}") from None
    return images


def condition_images(images: list, kind: str) -> list:
    """The ControlNet condition of each image (``image_metrics.condition_of``: gray or edges) as an RGB image."""
    import numpy as np
    import torch
    from PIL import Image

    from .image_metrics import condition_of

    out = []
    for image in images:
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        cond = condition_of(pixels, kind)[0, 0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(cond, mode="L").convert("RGB"))
    return out
