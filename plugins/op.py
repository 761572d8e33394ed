"""The custom op ``clear::attention``: one graph node for torch.compile / torch.export.

Layout as diffusers' attention dispatcher: q, k, v are (batch, tokens, heads, head_dim).
The backward runs the chosen backend's ``Backend.backward`` (today: each recomputes a forward
under autograd, so only the inputs are saved; the triton backend uses FlexAttention's backward).
``pool_weight``: the official "down" variant. Image queries also see the image's keys and values
pooled over f×f blocks with these weights (``spatial_weight``, f² numbers); text queries do not. The
pooling runs inside the op, so a converted model still traces to one attention node per site.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F

from .backends import QUERY_RANGE, call_needs, choose_backend
from .layout import TokenLayout, validate_call, with_text_queries
from .masking import OWN_ROW, VALID, ZEROED, text_padding
from .pooling import check_poolable, pool_image_tokens
from .schema import NAMES, bind, check_engine_call, engine_arguments, implements, torch_schema


@torch.library.custom_op("clear::attention", mutates_args=(), schema=torch_schema())
@implements()
def clear_attention(*args) -> torch.Tensor:
    """The op; its arguments are ``schema.ARGUMENTS`` (positional, as the dispatcher passes them)."""
    call = bind(args)
    q, rows = _all_queries(call)
    k, v = call["k"], call["v"]
    chosen, layout_args, options, rule = _prepared({**call, "q": q})
    if rows is not None and QUERY_RANGE in chosen.features:  # the zero text rows are dropped: not computed
        options = {**options, "image_queries": (0, layout_args[0].image_tokens)}
    out = _apply_rule(chosen.forward(q, k, v, *layout_args, **options), rule, q, k, v, layout_args[0], call["scale"],
                      call["attn_mask"])
    return (out if rows is None else out[:, rows]).contiguous()


def _all_queries(call: dict):
    """(queries of every token, the rows to keep or None). A call may bring the image's queries alone (an
    image-query-only call: image queries over the joined text and image keys); the text rows are filled
    with zeros for the backends, which compute whole sequences, and dropped from the result. An image row
    never depends on another query, so the image rows are exactly CLEAR's."""
    q, k = call["q"], call["k"]
    if q.shape[1] == k.shape[1]:
        return q, None
    return with_text_queries(q, call["text_len"], call["text_first"])


def _prepared(call: dict, *, return_lse: bool = False, backward: bool = False):
    """The backend for this call, its (layout, radius, scale), its keywords (pooled keys, text bias) and the
    rule per query row; what the op, its backward and the front door's log-sum-exp path all run."""
    q, k, v = call["q"], call["k"], call["v"]
    args, options = _with_pooled(_backend_args(call), k, v, call["pool_weight"])
    options, rule = _with_mask(options, args[0], call["attn_mask"], q.shape[0])
    needs = call_needs(args[0], **options, return_lse=return_lse, backward=backward, fp8=bool(call["fp8"]))
    return choose_backend(call["backend"], q, k, v, *args, needs=needs), args, options, rule


def _backend_args(call: dict):
    """(layout, radius, scale) as every backend takes them; ``images``: further grids, flat (h2, w2, h3, ...)."""
    tile = (int(call["tile_h"]), int(call["tile_w"])) if call["tile_h"] else None
    images = call["images"]
    grids = tuple(zip(map(int, images[::2]), map(int, images[1::2]))) if images else ()
    layout = TokenLayout(int(call["text_len"]), bool(call["text_first"]), int(call["height"]), int(call["width"]),
                         tile, images=grids)
    return layout, float(call["radius"]), call["scale"]


def pool_factor(pool_weight: torch.Tensor) -> int:
    factor = math.isqrt(pool_weight.numel())
    if factor < 2 or factor * factor != pool_weight.numel():
        raise ValueError(f"pool_weight must hold f x f weights (f >= 2), got shape {tuple(pool_weight.shape)}")
    return factor


def _with_pooled(args, k, v, pool_weight):
    """The backends' (layout, radius, scale) and their ``extra`` keyword: the pooled keys and values
    (nothing without pool_weight, so backends without extra keys keep their call)."""
    if pool_weight is None:
        return args, {}
    layout, *rest = args
    factor = pool_factor(pool_weight)
    extra = tuple(pool_image_tokens(t, layout, factor, pool_weight) for t in (k, v))
    return (dataclasses.replace(layout, extra_keys=extra[0].shape[1]), *rest), {"extra": extra}


def _with_mask(options, layout, attn_mask, batch):
    """The backends' ``text_bias`` keyword from a model's attention mask (none when it changes nothing),
    and what happens to each query row (masking.VALID / ZEROED / OWN_ROW; None: all valid)."""
    if attn_mask is None:
        return options, None
    text_bias, rule = text_padding(attn_mask, layout, batch)
    return ({**options, "text_bias": text_bias} if text_bias is not None else options), rule


def _text_rows(layout):
    return slice(0, layout.text_len) if layout.text_first else slice(layout.image_tokens, layout.seq_len)


def _text_own_rows(q, k, v, layout, scale, attn_mask):
    """Text queries over every key of the joint sequence under their own rows of the model's (queries x keys)
    mask (a padded text query: a constant row, plain attention; Ideogram 4's padding: the padding's keys)."""
    rows = _text_rows(layout)
    mask = attn_mask if attn_mask.dim() == 4 else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
    return F.scaled_dot_product_attention(q[:, rows].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask[:, :, rows], scale=scale).transpose(1, 2)


def _apply_rule(out, rule, q, k, v, layout, scale, attn_mask):
    """Rows of text queries the kernels do not run: zero (a bool mask hides every key from them), or their
    own row of the mask."""
    if rule is None:
        return out
    out = out * (rule != ZEROED)[:, :, None, None].to(out.dtype)
    text = _text_rows(layout)
    own = rule[:, text] == OWN_ROW
    if bool(own.any()):
        fixed = torch.where(own[:, :, None, None], _text_own_rows(q, k, v, layout, scale, attn_mask).to(out.dtype),
                            out[:, text])
        out = torch.cat([fixed, out[:, layout.text_len:]] if layout.text_first else [out[:, :text.start], fixed], 1)
    return out


@clear_attention.register_fake
def _(*args):
    call = bind(args)
    images = call["images"] or []
    others = sum(h * w for h, w in zip(images[::2], images[1::2]))
    q, v = call["q"], call["v"]
    torch._check(call["text_len"] + call["height"] * call["width"] + others == call["k"].shape[1],
                 lambda: "clear::attention: text_len + the images' tokens must equal the keys' token count")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_SAVED = ("q", "k", "v", "pool_weight", "attn_mask")  # tensors the backward needs (the rest are plain values)


def _setup_context(ctx, inputs, output):
    call = bind(inputs)
    ctx.save_for_backward(*(call[name] for name in _SAVED))
    ctx.call = {name: value for name, value in call.items() if name not in _SAVED}


def _backward(ctx, grad_out):
    call = {**ctx.call, **dict(zip(_SAVED, ctx.saved_tensors))}
    q, image_rows = _all_queries(call)
    if image_rows is not None:  # image queries alone: the text rows' gradient is zero
        full = grad_out.new_zeros((*q.shape[:-1], grad_out.shape[-1]))
        full[:, image_rows] = grad_out
        grad_out = full
    call["q"] = q
    k, v, pool_weight = call["k"], call["v"], call["pool_weight"]
    with torch.enable_grad():  # the pooling again, to carry the pooled keys' gradients to k, v and the weights
        leaves = [t.detach().requires_grad_(True) for t in (k, v, pool_weight)] if pool_weight is not None else []
        if leaves:
            call = {**call, "k": leaves[0], "v": leaves[1], "pool_weight": leaves[2]}
        chosen, args, options, rule = _prepared(call, backward=True)
    layout, scale = args[0], call["scale"]
    through_backend = grad_out if rule is None else grad_out * (rule == VALID)[:, :, None, None].to(grad_out.dtype)
    pooled = options.pop("extra", None)
    dq, dk, dv, dek, dev = chosen.backward(through_backend, q, k, v, *args,
                                           extra=tuple(t.detach() for t in pooled) if pooled else None, **options)
    if rule is not None and bool((rule == OWN_ROW).any()):  # the text rows under their own mask rows
        with torch.enable_grad():
            plain = [t.detach().requires_grad_(True) for t in (q, k, v)]
            rows = _text_rows(layout)
            weight = (rule[:, rows] == OWN_ROW)[:, :, None, None].to(grad_out.dtype)
            grads = torch.autograd.grad(_text_own_rows(*plain, layout, scale, call["attn_mask"]), plain,
                                        grad_out[:, rows] * weight)
        dq, dk, dv = dq + grads[0], dk + grads[1], dv + grads[2]
    grads = {"q": dq if image_rows is None else dq[:, image_rows], "k": dk, "v": dv}
    if pooled is not None:
        via_k, via_v, grads["pool_weight"] = torch.autograd.grad(pooled, leaves, (dek, dev))
        grads["k"], grads["v"] = dk + via_k, dv + via_v
    return tuple(grads.get(name) for name in NAMES)


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
              pool_weight: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
              images: tuple[tuple[int, int], ...] = (), return_lse: bool = False, fp8: bool = False):
    """Keyword front door to ``torch.ops.clear.attention`` with an early, readable check.

    ``pool_weight``: f x f weights (any shape holding f² numbers, e.g. the official (1, 1, 1, f, 1, f, 1)):
    every image query also sees the image pooled over f x f blocks with them, no text query does (the
    official "down" variant); the grid must be a multiple of f.
    ``attn_mask``: a model's text padding mask, as scaled_dot_product_attention takes it (see
    ``masking.text_padding`` for the forms CLEAR expresses). ``images``: the grids of further images
    after the first (height x width), e.g. FLUX.1 Kontext's reference image (``layout.TokenLayout``).
    ``return_lse``: also the log-sum-exp of each query row, (batch, tokens, heads) float32 natural log,
    from the chosen backend directly (reference, flex, triton; differentiable where the backend is:
    reference and flex), for merging partial results exactly (``merge_partials``).
    ``fp8``: FP8 (e4m3) attention where a backend declares it (``gluon-fp8`` on Hopper: the image queries;
    text queries and calls it cannot take run in the inputs' dtype). Off by default: never chosen unasked."""
    flat = [int(v) for grid in images for v in grid] or None
    image_queries_only = q.shape[1] != k.shape[1]
    if not isinstance(height, torch.SymInt):
        layout = TokenLayout(text_len, text_first, height, width, tile, images=tuple(images))
        validate_call(k if image_queries_only else q, k, v, layout, radius)  # the keys hold every token
        if image_queries_only and (q.shape[0], q.shape[1], *q.shape[2:]) != (k.shape[0], layout.image_tokens,
                                                                             *k.shape[2:]):
            raise ValueError(f"q of {q.shape[1]} tokens against k of {k.shape[1]}: queries are every token, or the "
                             f"{layout.image_tokens} image tokens alone; got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if pool_weight is not None:
            check_poolable(height, width, pool_factor(pool_weight))
    tile_h, tile_w = tile or (0, 0)
    call = bind((q, k, v), dict(text_len=text_len, text_first=text_first, height=height, width=width,
                                radius=float(radius), scale=scale, backend=backend, tile_h=tile_h, tile_w=tile_w,
                                pool_weight=pool_weight, attn_mask=attn_mask, images=flat, fp8=bool(fp8)))
    if image_queries_only and (return_lse or _Route.self_contained):
        raise ValueError("calls with the image's queries alone run through clear::attention only (no log-sum-exp, "
                         "no engines yet)")
    if return_lse:
        chosen, args, options, rule = _prepared(call, return_lse=True)
        out, lse = chosen.forward(q, k, v, *args, **options, return_lse=True)
        return _apply_rule(out, rule, q, k, v, args[0], scale, attn_mask), lse  # (lse: of the CLEAR rows)
    if _Route.self_contained:
        check_engine_call(call, "the self-contained kernel (engines)")
        if not tile_h:
            raise ValueError("the self-contained kernel needs the tile token layout")
        return torch.ops.clear.attention_aot(*engine_arguments(call))
    return torch.ops.clear.attention(*(call[name] for name in NAMES))
