"""Backend registry and chooser for clear::attention (NATTEN-style, and as diffusers' attention dispatcher
registers its backends with their constraints).

A backend is a same-signature forward (``reference_attention``'s), a ``reason`` function saying why it
cannot run a call (None: it can), the features it declares and a priority per device type. The chooser
and the validator share one refusal (``Backend.refusal``): a call's needs (``call_needs``) that the
backend does not declare, then its own reason. ``auto`` tries every registered backend that has a
priority for the call's device, highest first, and logs why it skipped each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .chunked import chunked_attention, chunked_reason
from .flex import flex_clear_attention, flex_reason
from .gluon_backend import clear_fwd_ws_kernel, gluon_clear_attention, gluon_reason
from .gluon_fp8_backend import gluon_fp8_clear_attention, gluon_fp8_reason
from .layout import TokenLayout, validate_call
from .reference import reference_attention, reference_reason
from .triton_aot import triton_aot_attention, triton_aot_reason
from .triton_backend import triton, triton_clear_attention, triton_reason

logger = logging.getLogger("clear_surgery")

# What a call may ask beyond plain CLEAR attention of one image, and what a backend may declare.
POOLED_KEYS = "pooled_keys"  # extra keys and values image queries see (the official "down" variant)
TEXT_BIAS = "text_bias"  # a per-sample bias on the text keys (text padding masks)
SEVERAL_IMAGES = "several_images"  # further images' grids after the first (FLUX.1 Kontext's references)
LSE = "lse"  # the log-sum-exp of each query row (return_lse)
QUERY_RANGE = "query_range"  # only the image queries of a range of image tokens (image_queries=(start, stop))
BACKWARD = "backward"  # gradients (the op's autograd)
IMAGE_ONLY = "image_only"  # no text segment: image-only self-attention (image_attention='local')
# FP8 (e4m3) arithmetic. Unlike the others, a wish, not a need: a call that asks for it still runs on a backend
# without it (in the inputs' dtype), and a backend that declares it runs only calls that ask (never silently).
FP8 = "fp8"
FEATURES = (POOLED_KEYS, TEXT_BIAS, SEVERAL_IMAGES, LSE, QUERY_RANGE, BACKWARD, IMAGE_ONLY, FP8)


@dataclass(frozen=True)
class Backend:
    """``forward(q, k, v, layout, radius, scale, *, extra=None, text_bias=None, return_lse=False,
    image_queries=None)`` as declared by ``features``; ``reason(q, k, v, layout, radius, scale)``: why it
    cannot run a call (dtype, device, layout), None when it can; ``backward(grad_out, q, k, v, layout, radius,
    scale, extra=None, text_bias=None) -> (dq, dk, dv, d extra keys, d extra values)``; ``priority``: device
    type -> rank for ``auto`` (higher first; a device not listed: the backend runs there only when named);
    ``auto_max_tokens``: device type -> the most tokens ``auto`` gives it there (above, the next backend by
    priority is faster; a named call is not limited)."""

    name: str
    forward: Callable[..., torch.Tensor]
    reason: Callable[..., str | None]
    backward: Callable[..., tuple] | None = None
    features: frozenset[str] = frozenset()
    priority: Mapping[str, int] = field(default_factory=dict)
    auto_max_tokens: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"backend {self.name!r}: unknown features {sorted(unknown)}; known: {FEATURES}")
        if (BACKWARD in self.features) != (self.backward is not None):
            raise ValueError(f"backend {self.name!r}: declare {BACKWARD!r} exactly when it has a backward")
        object.__setattr__(self, "features", frozenset(self.features))

    def refusal(self, q, k, v, layout: TokenLayout, radius: float, scale=None, needs=()) -> str | None:
        """Why this backend cannot run the call (None: it can). A malformed call raises instead."""
        validate_call(q, k, v, layout, radius)
        if FP8 in self.features and FP8 not in needs:
            return "runs only calls that ask for FP8 attention (fp8=True)"
        missing = [f for f in FEATURES if f in set(needs) - self.features - {FP8}]
        if missing:
            return f"does not support {', '.join(missing)}"
        return self.reason(q, k, v, layout, radius, scale)

    def can_run(self, q, k, v, layout: TokenLayout, radius: float, scale=None, *, needs=(),
                raise_error: bool = False) -> bool:
        why = self.refusal(q, k, v, layout, radius, scale, needs)
        if why and raise_error:
            raise ValueError(f"{self.name} backend: {why}")
        return why is None


def call_needs(layout: TokenLayout, *, extra=None, text_bias=None, return_lse=False, image_queries=None,
               backward=False, fp8=False) -> frozenset[str]:
    """The features a call with these options needs (``FP8``: asks for)."""
    wanted = {POOLED_KEYS: extra is not None or layout.extra_keys > 0, TEXT_BIAS: text_bias is not None,
              SEVERAL_IMAGES: bool(layout.images), LSE: return_lse, QUERY_RANGE: image_queries is not None,
              BACKWARD: backward, IMAGE_ONLY: layout.text_len == 0, FP8: fp8}
    return frozenset(name for name, yes in wanted.items() if yes)


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


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend: named calls reach it at once, ``auto`` where it has a priority."""
    if backend.name == "auto" or not backend.name:
        raise ValueError(f"a backend cannot be named {backend.name!r}")
    BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


_DENSE_MATH = frozenset({POOLED_KEYS, TEXT_BIAS, SEVERAL_IMAGES, LSE, BACKWARD})
# On CPU: the dense reference up to 1024 tokens, the chunked backend above (linear memory; 4.9 against 12.0 ms
# at 1101 tokens, 0.56 against 0.21 ms at 141, r = 4, 2 heads x 16, this project's 2-core CPU); FlexAttention's
# CPU path is unfused (N x N scores) and comes last. On a GPU the fast kernels come first (the warp-specialized
# Hopper kernel: 18.3 against 23.8 ms for the Triton kernel at 8192² r16, recipes/benchmarks/h200-run14-distill-pingpong).
register_backend(Backend("reference", reference_attention, reference_reason, recompute_backward(reference_attention),
                         _DENSE_MATH | {IMAGE_ONLY}, {"cpu": 20, "cuda": 0}, auto_max_tokens={"cpu": 1024}))
register_backend(Backend("chunked", chunked_attention, chunked_reason, recompute_backward(chunked_attention),
                         _DENSE_MATH | {IMAGE_ONLY}, {"cpu": 15, "mps": 15, "cuda": 5}))
register_backend(Backend("flex", flex_clear_attention, flex_reason, recompute_backward(flex_clear_attention),
                         _DENSE_MATH | {IMAGE_ONLY}, {"cpu": 5, "cuda": 20}))
if triton is not None:
    # Inference kernel; training uses FlexAttention's backward (same math, same mask).
    register_backend(Backend("triton", triton_clear_attention, triton_reason, recompute_backward(flex_clear_attention),
                             _DENSE_MATH | {QUERY_RANGE, IMAGE_ONLY}, {"cuda": 30}))
    # The self-contained kernel engines embed (tile layout only); chosen by name, not by "auto".
    register_backend(Backend("triton-aot", triton_aot_attention, triton_aot_reason,
                             recompute_backward(flex_clear_attention), frozenset({BACKWARD})))
if clear_fwd_ws_kernel is not None:
    # Warp-specialized Hopper kernel: plain CLEAR of one image (gluon_reason says which layouts)
    register_backend(Backend("gluon", gluon_clear_attention, gluon_reason, recompute_backward(flex_clear_attention),
                             frozenset({LSE, BACKWARD, IMAGE_ONLY}), {"cuda": 40}))
    # Its FP8 twin (image queries in e4m3; inference only): runs only calls that ask for FP8 attention
    register_backend(Backend("gluon-fp8", gluon_fp8_clear_attention, gluon_fp8_reason, features=frozenset({LSE, FP8}),
                             priority={"cuda": 50}))


def choose_backend(requested: str, q, k, v, layout: TokenLayout, radius: float, scale=None, *,
                   needs=()) -> Backend:
    """The backend to run for this call; ``requested`` may be 'auto' or a backend name; ``needs``: the
    call's features beyond plain attention (``call_needs``)."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown CLEAR backend {requested!r}; available: {backend_names()}")
        chosen = BACKENDS[requested]
        asked = {FP8} & chosen.features  # naming an FP8 backend is asking for FP8 attention
        chosen.can_run(q, k, v, layout, radius, scale, needs=set(needs) | asked, raise_error=True)
        return chosen
    device = q.device.type
    tokens = q.shape[1]
    ranked = sorted((b for b in BACKENDS.values() if device in b.priority and tokens <= b.auto_max_tokens.get(
        device, tokens)), key=lambda b: -b.priority[device])
    skipped = []
    for backend in ranked:
        why = backend.refusal(q, k, v, layout, radius, scale, needs)
        if why is None:
            return backend
        logger.info("clear::attention: skipping backend %s: %s", backend.name, why)
        skipped.append(f"{backend.name}: {why}")
    raise ValueError(f"no CLEAR backend can run q{tuple(q.shape)} {q.dtype} on {q.device}"
                     + (f" ({'; '.join(skipped)})" if skipped else ""))
