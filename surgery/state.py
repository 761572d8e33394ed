"""The public state of a converted model: one object, read with ``get_clear_state(model)``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .analysis import AnalysisReport
from .config import ClearConfig
from .families import ModelFamily
from .processors import ClearRuntime

_ATTRIBUTE = "_clear_state"  # the one attribute apply_clear sets on a model; read only through this module


@dataclass
class ClearState:
    """What ``apply_clear`` did to a model.

    config: the ClearConfig applied; family: the model family it was resolved to; sites: names of
    the converted attention modules; analysis: the analysis of the model before the rewrite;
    runtime: what the CLEAR processors share at run time (current grid, tile, original processors);
    provenance: how the CLEAR tensors were made (None: zero-shot), carried into saved checkpoints.
    """

    config: ClearConfig
    family: ModelFamily
    sites: list[str]
    analysis: AnalysisReport
    runtime: ClearRuntime
    provenance: dict | None = field(default=None)


def get_clear_state(model: torch.nn.Module) -> ClearState | None:
    """The CLEAR state of ``model``, or None when it has no CLEAR attention."""
    return getattr(model, _ATTRIBUTE, None)


def require_clear_state(model: torch.nn.Module, action: str = "do this") -> ClearState:
    state = get_clear_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no CLEAR attention (run apply_clear first) to {action}")
    return state


def attach(model: torch.nn.Module, state: ClearState) -> None:
    object.__setattr__(model, _ATTRIBUTE, state)


def detach(model: torch.nn.Module) -> None:
    object.__delattr__(model, _ATTRIBUTE)
