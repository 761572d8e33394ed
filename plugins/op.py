"""The custom op ``clear::attention``: one graph node for torch.compile / torch.export.

Layout as diffusers' attention dispatcher: q, k, v are (batch, tokens, heads, head_dim).
A backend with a native backward (``Backend.backward``) runs it; the others recompute their
forward under autograd in the backward pass (memory-light: only q, k, v are saved).
"""

from __future__ import annotations

import torch

from .backends import choose_backend
from .layout import validate_call


@torch.library.custom_op("clear::attention", mutates_args=())
def clear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int,
                    text_first: bool, height: int, width: int, radius: float,
                    scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    args = (text_len, text_first, height, width, radius, scale)
    chosen = choose_backend(backend, q, k, v, *args)
    return chosen.forward(q, k, v, *args).contiguous()


@clear_attention.register_fake
def _(q, k, v, text_len, text_first, height, width, radius, scale=None, backend="auto"):
    torch._check(text_len + height * width == q.shape[1],
                 lambda: "clear::attention: text_len + height * width must equal the token count")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _recompute_backward(forward, grad_out, q, k, v, *args):
    # Backends without a native backward: differentiate their own forward (recomputed here, so
    # the forward saved nothing but q, k, v).
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = forward(*leaves, *args)
        return torch.autograd.grad(out, leaves, grad_out)


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    ctx.save_for_backward(q, k, v)
    ctx.rest = rest


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    *args, backend = ctx.rest
    chosen = choose_backend(backend, q, k, v, *args)
    native = getattr(chosen, "backward", None)
    if native is not None:
        dq, dk, dv = native(grad_out, q, k, v, *args)
    else:
        dq, dk, dv = _recompute_backward(chosen.forward, grad_out, q, k, v, *args)
    return dq, dk, dv, *([None] * len(ctx.rest))


clear_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, *, text_len: int, text_first: bool, height: int, width: int,
              radius: float, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Keyword front door to ``torch.ops.clear.attention`` with an early, readable check."""
    if not isinstance(height, torch.SymInt):
        validate_call(q, k, v, text_len, height, width, radius)
    return torch.ops.clear.attention(q, k, v, text_len, text_first, height, width, float(radius),
                                     scale, backend)
