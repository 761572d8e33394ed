"""Backend registry and chooser for clear::attention (NATTEN-style).

Each backend has a same-signature function and a ``can_run_*`` check; the chooser and the
validator share those checks, and the chooser logs why it skipped a backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .flex import can_run_flex, flex_clear_attention
from .gluon_backend import can_run_gluon, clear_fwd_ws_kernel, gluon_clear_attention
from .reference import can_run_reference, reference_attention
from .triton_aot import can_run_triton_aot, triton_aot_attention
from .triton_backend import can_run_triton, triton, triton_clear_attention

logger = logging.getLogger("clear_surgery")


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable[..., torch.Tensor]
    can_run: Callable[..., bool]
    # (grad_out, q, k, v, *args, extra=None, text_bias=None) -> (dq, dk, dv, d extra keys, d extra values)
    backward: Callable[..., tuple[torch.Tensor, ...]]


def recompute_backward(forward):
    """A backward that differentiates ``forward`` (recomputed; only the inputs were saved). The
    gradients of the extra keys and values are None without them."""

    def backward(grad_out, q, k, v, *args, extra=None, **options):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v, *(extra or ()))]
            extra_leaves = tuple(leaves[3:]) or None
            grads = torch.autograd.grad(forward(*leaves[:3], *args, extra=extra_leaves, **options), leaves, grad_out)
        return (*grads, None, None) if extra is None else tuple(grads)

    return backward


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference_attention, can_run_reference, recompute_backward(reference_attention)),
    "flex": Backend("flex", flex_clear_attention, can_run_flex, recompute_backward(flex_clear_attention)),
}
if triton is not None:
    # Inference kernel; training falls back to FlexAttention's backward (same math, same mask).
    BACKENDS["triton"] = Backend("triton", triton_clear_attention, can_run_triton,
                                 recompute_backward(flex_clear_attention))
    # The self-contained kernel engines embed (tile layout only); chosen by name, not by "auto".
    BACKENDS["triton-aot"] = Backend("triton-aot", triton_aot_attention, can_run_triton_aot,
                                     recompute_backward(flex_clear_attention))

if clear_fwd_ws_kernel is not None:
    # Warp-specialized Hopper kernel (common case only; can_run_gluon says why not otherwise)
    BACKENDS["gluon"] = Backend("gluon", gluon_clear_attention, can_run_gluon, recompute_backward(flex_clear_attention))

# Preference for backend="auto": the fast kernels first on GPU (the warp-specialized Hopper kernel where it can
# run: 20.3 against 24.0 ms at 8192² r16, recipes/benchmarks/h200-run13-gluon); on CPU the dense reference
# beats FlexAttention's unfused fallback at the sizes a CPU can handle.
PREFERENCE = {"cuda": ("gluon", "triton", "flex", "reference"), "cpu": ("reference", "flex")}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def choose_backend(requested: str, q, k, v, *args) -> Backend:
    """The backend to run for this call; ``requested`` may be 'auto' or a backend name.
    ``args`` = (layout, radius, scale), as every backend takes them."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown CLEAR backend {requested!r}; available: {backend_names()}")
        BACKENDS[requested].can_run(q, k, v, *args, raise_error=True)
        return BACKENDS[requested]
    for name in PREFERENCE.get(q.device.type, ("flex", "reference")):
        backend = BACKENDS.get(name)
        if backend is None:
            logger.debug("clear::attention: backend %s is not available", name)
            continue
        try:
            backend.can_run(q, k, v, *args, raise_error=True)
            return backend
        except ValueError as err:
            logger.info("clear::attention: skipping backend %s: %s", name, err)
    raise ValueError(f"no CLEAR backend can run q{tuple(q.shape)} {q.dtype} on {q.device}")
