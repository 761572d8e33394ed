"""The custom op ``clear::attention``: one graph node for torch.compile / torch.export.

Layout as diffusers' attention dispatcher: q, k, v are (batch, tokens, heads, head_dim).
The backward runs the chosen backend's ``Backend.backward`` (today: each recomputes a forward
under autograd, so only q, k, v are saved; the triton backend uses FlexAttention's backward).
"""

from __future__ import annotations

import contextlib

import torch

from .backends import choose_backend
from .layout import TokenLayout, validate_call


@torch.library.custom_op("clear::attention", mutates_args=())
def clear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int,
                    text_first: bool, height: int, width: int, radius: float,
                    scale: float | None = None, backend: str = "auto", tile_h: int = 0,
                    tile_w: int = 0) -> torch.Tensor:
    args = _backend_args(text_len, text_first, height, width, radius, scale, tile_h, tile_w)
    chosen = choose_backend(backend, q, k, v, *args)
    return chosen.forward(q, k, v, *args).contiguous()


def _backend_args(text_len, text_first, height, width, radius, scale, tile_h, tile_w):
    tile = (int(tile_h), int(tile_w)) if tile_h else None
    return TokenLayout(int(text_len), bool(text_first), int(height), int(width), tile), float(radius), scale


@clear_attention.register_fake
def _(q, k, v, text_len, text_first, height, width, radius, scale=None, backend="auto", tile_h=0, tile_w=0):
    torch._check(text_len + height * width == q.shape[1],
                 lambda: "clear::attention: text_len + height * width must equal the token count")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    ctx.save_for_backward(q, k, v)
    ctx.rest = rest


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    text_len, text_first, height, width, radius, scale, backend, tile_h, tile_w = ctx.rest
    args = _backend_args(text_len, text_first, height, width, radius, scale, tile_h, tile_w)
    dq, dk, dv = choose_backend(backend, q, k, v, *args).backward(grad_out, q, k, v, *args)
    return dq, dk, dv, *([None] * len(ctx.rest))


clear_attention.register_autograd(_backward, setup_context=_setup_context)


class _Route:
    # a plain attribute, not a ContextVar: torch.compile reads it (with a guard) instead of breaking the graph
    self_contained = False


@contextlib.contextmanager
def self_contained_attention():
    """Inside this block, CLEAR attention calls go to ``clear::attention_aot``: the self-contained kernel
    as a ``triton_op`` (tile token layout only), which AOTInductor compiles into a package. Meant for
    the tracing step of an export, in one thread."""
    previous, _Route.self_contained = _Route.self_contained, True
    try:
        yield
    finally:
        _Route.self_contained = previous


def attention(q, k, v, *, text_len: int, text_first: bool, height: int, width: int, radius: float,
              scale: float | None = None, backend: str = "auto", tile: tuple[int, int] | None = None,
              return_lse: bool = False):
    """Keyword front door to ``torch.ops.clear.attention`` with an early, readable check.

    ``return_lse``: also the log-sum-exp of each query row, (batch, tokens, heads) float32 natural log,
    from the chosen backend directly (reference, flex, triton; differentiable where the backend is:
    reference and flex), for merging partial results exactly (``merge_partials``)."""
    if not isinstance(height, torch.SymInt):
        validate_call(q, k, v, TokenLayout(text_len, text_first, height, width, tile), radius)
    tile_h, tile_w = tile or (0, 0)
    if return_lse:
        if backend == "triton-aot":
            raise ValueError("the triton-aot backend (the engines' self-contained kernel) returns no log-sum-exp")
        args = _backend_args(text_len, text_first, height, width, radius, scale, tile_h, tile_w)
        return choose_backend(backend, q, k, v, *args).forward(q, k, v, *args, return_lse=True)
    if _Route.self_contained:
        if not tile_h:
            raise ValueError("the self-contained kernel needs the tile token layout")
        return torch.ops.clear.attention_aot(q, k, v, height, width, float(radius), bool(text_first), tile_h, tile_w,
                                             float(scale or 0.0))
    return torch.ops.clear.attention(q, k, v, text_len, text_first, height, width, float(radius),
                                     scale, backend, tile_h, tile_w)
