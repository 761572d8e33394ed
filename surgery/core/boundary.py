"""Where image tokens enter and leave a model: one set of hooks at the places its family's ``TilePlan``
names, which the tile layout (permute on entry, permute back on exit) and patch parallelism (cut one band
of rows on entry, gather the bands on exit) both build on."""

from __future__ import annotations

import torch
from diffusers.utils import BaseOutput

from .families.base import TilePlan, bound_arguments


def map_tensors(obj, fn):
    """fn applied to every leaf of a model output (a diffusers BaseOutput, lists and tuples of tensors)."""
    if isinstance(obj, BaseOutput):
        for key in list(obj.keys()):
            obj[key] = map_tensors(obj[key], fn)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    return fn(obj)


def is_token_tensor(x, tokens: int) -> bool:
    """A (batch, tokens, channels) tensor of exactly ``tokens`` tokens."""
    return isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == tokens


class TokenBoundary:
    """Hooks on the model and on the plan's token and exit modules. A subclass says what happens there:
    ``start`` once per call (before the entry), ``enter`` on every image-token tensor coming in (forward
    arguments, token modules' outputs), ``enter_ids`` on the position ids, ``leave`` on every tensor going
    out (exit modules' outputs, the model's outputs). ``outermost``: this boundary's exit runs before the
    exits of boundaries registered earlier (patch parallelism gathers bands before the tile layout
    permutes back)."""

    def __init__(self, model: torch.nn.Module, plan: TilePlan, *, outermost: bool = False):
        self.tile_plan, self.handles = plan, []
        self.handles.append(model.register_forward_pre_hook(self._entry, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._exit, with_kwargs=True, prepend=outermost))
        for names, hook, prepend in ((plan.token_modules, self._module_entry, False),
                                     (plan.exit_modules, self._module_exit, outermost)):
            for name in names:
                module = getattr(model, name, None)
                if isinstance(module, torch.nn.Module):
                    self.handles.append(module.register_forward_hook(hook, prepend=prepend))

    def start(self, model) -> None:
        raise NotImplementedError

    def enter(self, x):
        raise NotImplementedError

    def enter_ids(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def leave(self, x):
        raise NotImplementedError

    def _entry(self, model, args, kwargs):
        self.start(model)
        bound = bound_arguments(model, args, kwargs)
        for name in [n for n in self.tile_plan.entry_tensors if n in bound]:
            bound[name] = self.enter(bound.get(name))
        for name in self.tile_plan.entry_lists:
            if bound.get(name) is not None:
                bound[name] = [self.enter(x) for x in bound[name]]
        ids = bound.get(self.tile_plan.ids) if self.tile_plan.ids else None
        if ids is not None:
            bound[self.tile_plan.ids] = self.enter_ids(ids)
        return (), bound

    def _exit(self, model, args, kwargs, output):
        return map_tensors(output, self.leave)

    def _module_entry(self, module, args, output):
        return self.enter(output)

    def _module_exit(self, module, args, output):
        return self.leave(output)

    def remove(self):
        for handle in self.handles:
            handle.remove()
