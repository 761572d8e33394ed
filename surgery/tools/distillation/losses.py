"""Distillation loss pieces: which attention outputs are compared, hooks that capture them, and the
flow-matching timestep distribution."""

from __future__ import annotations

import contextlib
import fnmatch
import re

import torch

from clear_surgery.surgery import get_clear_state
from clear_surgery.surgery.core.errors import InvalidValueError

from .recipe import OFFICIAL_ATTENTION_LAYERS


class DistillError(InvalidValueError):
    pass


def attention_layer_names(model, rule) -> list[str]:
    """Converted attention modules whose outputs the attention loss compares."""
    sites = list(get_clear_state(model).sites)
    if rule == OFFICIAL_ATTENTION_LAYERS:
        for stack in get_clear_state(model).family.loss_stacks:  # the family's, in its order of preference
            chosen = [s for s in sites if (m := re.fullmatch(rf"{stack}\.(\d+)\.attn", s)) and int(m[1]) % 4 == 0]
            if chosen:
                return chosen
        return []
    chosen = [s for s in sites if any(fnmatch.fnmatchcase(s, p) for p in rule)]
    if not chosen:
        raise DistillError(f"loss.attention_layers {rule} match no converted attention module; "
                           f"converted: {sites[:6]}{' ...' if len(sites) > 6 else ''}")
    return chosen


class AttentionCapture:
    """Forward hooks keeping the outputs of some attention modules while ``active``."""

    def __init__(self, model, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            if self.active:  # gradient checkpointing re-runs blocks in backward: ignore those calls
                parts = output if isinstance(output, tuple) else (output,)
                self.outputs[name] = torch.cat([p.flatten(1) for p in parts], dim=1)
        return hook

    @contextlib.contextmanager
    def record(self):
        self.outputs, self.active = {}, True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self):
        for h in self.handles:
            h.remove()


def sample_sigmas(train, count: int, generator: torch.Generator) -> torch.Tensor:
    if train.timestep_sampling == "uniform":
        sigma = torch.rand(count, generator=generator)
    else:  # logit-normal, as SD3/FLUX training
        sigma = torch.sigmoid(torch.randn(count, generator=generator))
    shift = train.timestep_shift
    return shift * sigma / (1 + (shift - 1) * sigma)
