"""Tensor files applied to models: the names and shapes a safetensors file holds, checked against a
model, then copied in (CLEAR layers, and the tensors CLEAR adds that converted folders keep apart)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clear_surgery.surgery.core.errors import MismatchError
from clear_surgery.surgery.core.state import is_clear_tensor

from .checkpoint import listed, tensor_mismatches
from .safetensors_io import read_header, read_tensor


class ClearLayersError(MismatchError):
    pass


def layer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: entry.shape for name, entry in read_header(path).tensors.items()}


def check_layer_fit(expected: dict[str, tuple[int, ...]], path: Path, what: str, *, before_rewrite: bool = False) -> None:
    """Every tensor of the layers file must exist in the model with the same shape. ``before_rewrite``: the
    model is not converted yet, so the tensors CLEAR itself adds (spatial_weight) are checked later."""
    found = layer_shapes(path)
    if before_rewrite:
        found = {n: shape for n, shape in found.items() if not is_clear_tensor(n)}
    problems = [p for p in tensor_mismatches(expected, found) if not p.startswith("missing")]
    if problems:
        raise ClearLayersError(f"CLEAR layers {path.name} do not fit {what} ({len(problems)} problems):\n  "
                               + listed(problems))


def apply_layer_tensors(model, path: str | os.PathLike) -> list[str]:
    """Copy the tensors of a safetensors file into ``model`` (in place) after checking every name and
    shape; returns the names written. Nothing is changed when anything mismatches."""
    path = Path(path)
    header = read_header(path)
    state = model.state_dict()
    check_layer_fit({n: tuple(t.shape) for n, t in state.items()}, path, type(model).__name__)
    with torch.no_grad():
        for name in header.tensors:  # one tensor in memory at a time
            state[name].copy_(read_tensor(header, name).to(state[name].dtype))
    return sorted(header.tensors)
