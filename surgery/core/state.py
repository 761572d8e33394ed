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


# Tensors CLEAR itself adds to a model (the "down" variant's spatial_weight, one per converted
# attention); saved apart from the stock weights so that stock diffusers still loads those.
CLEAR_TENSOR_SUFFIXES = (".processor.spatial_weight",)


def is_clear_tensor(name: str) -> bool:
    return name.endswith(CLEAR_TENSOR_SUFFIXES)


def clear_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries CLEAR's processors own (empty for plain CLEAR). A model on the meta
    device (a conversion that never loads the weights) gets their initial values, in its dtype."""
    state = require_clear_state(model, "list its CLEAR tensors")
    found = {}
    for site in state.sites:
        processor = model.get_submodule(site).processor
        for name, tensor in processor.named_parameters():
            if tensor.is_meta:
                tensor = processor.initial_tensors()[name].to(tensor.dtype)
            found[f"{site}.processor.{name}"] = tensor.detach()
    return found
