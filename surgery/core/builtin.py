"""Built-in tiny models (``builtin:NAME``): architectures of the model families at toy size, built
offline from small configs with a fixed seed, and whole tiny pipelines around them. Each family
module declares its own (``ModelFamily.builtins`` / ``tiny_pipeline``)."""

from __future__ import annotations

import torch

from . import tiny
from .families import FAMILIES, is_controlnet

BUILTIN_PREFIX = "builtin:"


def _builtins() -> dict:
    """tiny name -> (family, class name, config)."""
    return {name: (family, cls, config) for family in FAMILIES for name, (cls, config) in family.builtins.items()}


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + n for n in _builtins()]


def _key(name: str) -> str:
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in _builtins():
        raise ValueError(f"unknown built-in model {name!r}; available: {builtin_names()}")
    return key


def builtin_class(name: str) -> str:
    """The diffusers class name of a built-in model."""
    return _builtins()[_key(name)][1]


def load_builtin(name: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The built-in model ``name`` (with or without the ``builtin:`` prefix), in eval mode."""
    import diffusers

    _, class_name, config = _builtins()[_key(name)]

    def build():
        model = getattr(diffusers, class_name)(**config)
        if is_controlnet(class_name):
            tiny.fill_zero_parameters(model)
        return model

    model = tiny.seeded(build).eval()
    return model.to(dtype) if dtype is not None else model


def tiny_pipeline(name: str):
    """A whole diffusers pipeline (text encoders, tokenizers, VAE, scheduler) around a built-in model."""
    key = _key(name)
    family = _builtins()[key][0]
    if family.tiny_pipeline is None:
        raise ValueError(f"no built-in pipeline for {name!r} ({family.name} family)")
    return family.tiny_pipeline(key, load_builtin)


def build_tiny_model(row: str):
    """The tiny model of one coverage-table row and its example call: (model, forward kwargs or None for the
    family's own example call[, text tokens, image tokens]), seeded, in eval mode."""
    from .families import tiny_models

    build = tiny_models()[row]
    if isinstance(build, str):
        return load_builtin(build), None
    model, *rest = tiny.seeded(build, 0)
    return model.eval(), *rest
