"""The registry of model families: every module of this package that defines ``FAMILY`` is one.

A new architecture is one new module here (plus its test); nothing else lists families. The rest of
the code asks this registry which family a model is and reads the answer's fields.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import ExportPlan, GridError, ModelFamily, PackedSequence, TilePlan, image_grid
from .examples import GRID as EXAMPLE_GRID
from .examples import T as EXAMPLE_TEXT_TOKENS


def _discover() -> tuple[ModelFamily, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "examples", "unconverted"):
            family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
            if family is not None:
                found.append(family)
    families = tuple(sorted(found, key=lambda f: (f.order, f.name)))
    claimed = [c for f in families for c in f.class_names]
    if len(claimed) != len(set(claimed)):
        raise RuntimeError(f"two model families claim the same class: {sorted(claimed)}")
    return families


FAMILIES: tuple[ModelFamily, ...] = _discover()


def tiny_models() -> dict:
    """Every tiny model the project knows, by coverage-table row: the families' (in registry order), then
    those of architectures that do not convert. Values: a built-in's name or a builder (see TINY_MODELS)."""
    from .unconverted import TINY_MODELS as unconverted

    return {**{row: build for family in FAMILIES for row, build in family.tiny_models.items()}, **unconverted}


def is_controlnet(class_name: str) -> bool:
    """Whether ``class_name`` is a ControlNet of a known family (it runs inside a pipeline, beside a transformer)."""
    family = family_for_class(class_name)
    return family is not None and class_name in family.controlnets


def family_for_class(class_name: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if class_name in f.class_names), None)


def family_of(model) -> ModelFamily:
    """The family of ``model``; a clear error for a model clear-surgery does not know."""
    family = family_for_class(type(model).__name__)
    if family is None:
        known = sorted(n for f in FAMILIES for n in f.class_names)
        raise ValueError(f"{type(model).__name__} is not a model family clear-surgery knows; known: {known}. "
                         "Pass example_inputs, text_tokens and image_tokens to analyze() for other models.")
    return family


def example_inputs(model, text_len=EXAMPLE_TEXT_TOKENS, grid=EXAMPLE_GRID, batch=1, *, family=None) -> dict:
    """Forward kwargs of a call with ``text_len`` text tokens on an image grid ``grid`` (random values)."""
    param = next(model.parameters())
    family = family or family_of(model)
    return family.example_inputs(model, text_len, grid[0], grid[1], batch, param.dtype, param.device)


__all__ = ["EXAMPLE_GRID", "EXAMPLE_TEXT_TOKENS", "ExportPlan", "FAMILIES", "GridError", "ModelFamily", "PackedSequence", "TilePlan",
           "example_inputs", "family_for_class", "family_of", "image_grid", "is_controlnet", "tiny_models"]
