"""CLEAR attention processors: the stock diffusers processors' math with the attention call
replaced by ``clear::attention``. Modules keep their weights (state-dict keys unchanged).

Here: the runtime shared by a model's processors, the base class of the dedicated processors (each
lives in its family's module) and the generic route for any stock processor."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from clear_surgery.plugins import attention, spatial_weight_shape


@dataclass
class AttentionCall:
    """One attention call of a CLEAR processor, as the run-time route sees it. Tensors are
    (batch, tokens, heads, head_dim); ``text_len`` counts every token that is not an image token of this
    process (text, and nothing else); ``op`` runs the call (default: ``clear::attention``)."""

    site: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    text_len: int
    text_first: bool
    height: int
    width: int
    radius: float
    backend: str
    images: tuple = ()
    tile: tuple[int, int] | None = None
    scale: float | None = None
    attn_mask: torch.Tensor | None = None
    pool_weight: torch.Tensor | None = None
    fp8: bool = False  # FP8 attention asked for (set_backend(..., fp8_attention=True))
    op: Callable[["AttentionCall"], torch.Tensor] | None = None

    def tokens(self) -> int:
        """Tokens of the whole sequence (all images, all text), whichever part this process holds."""
        return self.text_len + self.height * self.width + sum(h * w for h, w in self.images)

    def run(self) -> torch.Tensor:
        return (self.op or clear_attention)(self)


def clear_attention(call: AttentionCall) -> torch.Tensor:
    """The call through ``clear::attention``: the route's last step unless a tool replaced it."""
    return attention(call.query, call.key, call.value, text_len=call.text_len, text_first=call.text_first,
                     height=call.height, width=call.width, radius=call.radius, backend=call.backend, tile=call.tile,
                     scale=call.scale, pool_weight=call.pool_weight, attn_mask=call.attn_mask, images=call.images,
                     fp8=call.fp8)


# A step of the run-time route: sees the call, may change it (dataclasses.replace) and hand it on with
# ``proceed``, or answer it itself.
Route = Callable[[AttentionCall, Callable[[AttentionCall], torch.Tensor]], torch.Tensor]


@dataclass
class ClearRuntime:
    """Per-model state shared by its CLEAR processors: the current call's image grid, the run-time choices
    that are not part of the saved config (the backend), and the route every attention call takes.

    Tools change what attention does by adding a named step to the route (``add_route``): the locality
    profiler answers calls itself, proportional attention changes the scale, patch parallelism hands the
    call to the band-parallel op. Steps run in list order; the last one's ``proceed`` runs ``call.run()``."""

    backend: str = "auto"  # which backend of clear_surgery.plugins runs the op (set_backend changes it)
    fp8_attention: bool = False  # ask for FP8 attention where a backend has it (set_backend changes it)
    grid: tuple[int, int] | None = None
    images: tuple[tuple[int, int], ...] = ()  # further images' grids in the current call (FLUX.1 Kontext)
    tile: tuple[int, int] | None = None  # tile token layout, None: raster
    originals: dict = field(default_factory=dict)  # module name -> replaced processor (for undo)
    hooks: list = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)  # name -> step, in the order they run

    def current_grid(self) -> tuple[int, int]:
        if self.grid is None:
            raise RuntimeError("CLEAR processor called outside its model's forward: no image grid is set")
        return self.grid

    def add_route(self, name: str, step: Route, *, first: bool = False) -> None:
        """Add a step to every attention call's route (``first``: before the steps already there)."""
        if name in self.routes:
            raise ValueError(f"{name} is on this model's attention route already")
        self.routes = {name: step, **self.routes} if first else {**self.routes, name: step}

    def remove_route(self, name: str) -> None:
        self.routes.pop(name, None)

    @contextlib.contextmanager
    def routed(self, name: str, step: Route):
        """``step`` on the route inside the block only."""
        self.add_route(name, step)
        try:
            yield
        finally:
            self.remove_route(name)

    def route(self, call: AttentionCall) -> torch.Tensor:
        steps = list(self.routes.values())

        def proceed(call: AttentionCall, i: int = 0) -> torch.Tensor:
            if i == len(steps):
                return call.run()
            return steps[i](call, lambda next_call: proceed(next_call, i + 1))

        return proceed(call)


class ClearProcessorBase(torch.nn.Module):
    """A module, as the official "down" processor is: with ``down_factor`` it owns ``spatial_weight``
    (state-dict key ``<attention>.processor.spatial_weight``, as the official checkpoints name it);
    without, it holds no tensor and the model's state dict is the stock one."""

    text_first: bool  # segment order the processor builds
    padding_after_image = False  # a packed batch padded after each sample's image (families' PackedSequence)

    def __init__(self, runtime: ClearRuntime, radius: float, name: str = "", down_factor: int | None = None):
        super().__init__()
        self.runtime, self.name = runtime, name
        self.radius = float(radius)
        self.down_factor = down_factor
        if down_factor:
            self.spatial_weight = torch.nn.Parameter(self.initial_tensors()["spatial_weight"])

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this processor owns, as a new one starts (the official initialisation: the mean)."""
        f = self.down_factor
        return {"spatial_weight": torch.full(spatial_weight_shape(f), 1.0 / (f * f))} if f else {}

    def _attend(self, query, key, value, attention_mask, scale=None):
        """(batch, tokens, heads, head_dim) in, same out. ``attention_mask``: the model's text padding mask as
        scaled_dot_product_attention takes it (bool or additive, broadcastable to (batch, heads, q, k))."""
        if self.padding_after_image and attention_mask is not None:
            height, width = self.runtime.current_grid()
            order = padding_before_image(attention_mask, height * width)
            if order is not None:  # [text_i, image, padding] -> [text_i, padding, image], and back
                query, key, value = (_gather_tokens(t, order, 1) for t in (query, key, value))
                mask = _gather_tokens(attention_mask.expand(*attention_mask.shape[:-1], key.shape[1]), order, -1)
                out = self._attend_in_layout(query, key, value, mask, scale)
                return _gather_tokens(out, torch.argsort(order, dim=1), 1)
        return self._attend_in_layout(query, key, value, attention_mask, scale)

    def _attend_in_layout(self, query, key, value, attention_mask, scale=None):
        runtime = self.runtime
        height, width = runtime.current_grid()
        images = runtime.images
        # the keys hold every token (the queries may be the image's alone: an image-query-only call)
        # the layer's name only where a route step reads it: every block then traces to the same graph (a
        # compiler guards on each string it reads; diffusers' compile_repeated_blocks shares one graph per block class)
        site = self.name if runtime.routes else ""
        call = AttentionCall(site, query, key, value, key.shape[1] - height * width - sum(h * w for h, w in images),
                             self.text_first, height, width, self.radius, runtime.backend, images, runtime.tile, scale,
                             attention_mask, self.spatial_weight if self.down_factor else None,
                             fp8=runtime.fp8_attention)
        return runtime.route(call)

    def _down(self) -> str:
        return f", down_factor={self.down_factor}" if self.down_factor else ""

    def __repr__(self):
        return f"{type(self).__name__}(radius={self.radius:g}, backend={self.runtime.backend!r}{self._down()})"


def padding_before_image(attention_mask: torch.Tensor, image_tokens: int) -> torch.Tensor | None:
    """For a packed batch laid out [text_i, image, padding] per sample (unequal text lengths, each sample padded at
    its end; ``attention_mask``: the key mask, True or 0 where a key counts), the token order that makes it
    [text_i, padding, image]: one layout for the whole batch (the image last, every other token text, the padding
    masked as keys). (batch, tokens) long; None when no sample is padded."""
    keys = attention_mask.reshape(attention_mask.shape[0], -1, attention_mask.shape[-1])[:, 0]
    valid = keys if keys.dtype == torch.bool else keys == 0
    tokens = valid.shape[-1]
    lengths = valid.sum(-1, keepdim=True)
    if bool((lengths == tokens).all()):
        return None
    if not bool(valid.equal(torch.arange(tokens, device=valid.device) < lengths)):
        raise ValueError("a packed sequence's padding must follow each sample's image (the mask's valid keys "
                         "first)")
    text, padding = lengths - image_tokens, tokens - lengths
    j = torch.arange(tokens, device=valid.device).expand(valid.shape[0], -1)
    return torch.where(j < text, j, torch.where(j < text + padding, j + image_tokens, j - padding))


def _gather_tokens(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with its tokens (dimension ``dim``) taken in ``order`` (batch, tokens) per sample."""
    dim = dim % t.dim()
    index = order.reshape(order.shape[0], *(1,) * (dim - 1), order.shape[1], *(1,) * (t.dim() - dim - 1))
    return t.expand(order.shape[0], *t.shape[1:]).gather(dim, index.expand(order.shape[0], *t.shape[1:]))


class _RouteSDPA(torch.overrides.TorchFunctionMode):
    """Sends scaled_dot_product_attention calls to a CLEAR processor (other ops run unchanged)."""

    def __init__(self, processor):
        super().__init__()
        self.processor = processor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            return self.processor.sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class ClearSDPAProcessor(ClearProcessorBase):
    """Any stock processor whose joint attention is one scaled_dot_product_attention over the
    concatenated text+image sequence: the stock processor runs unchanged and that one call goes
    to ``clear::attention``. Used where no dedicated CLEAR processor exists; the rewrite re-traces
    the model and undoes itself unless exactly the attention call changed."""

    def __init__(self, original, runtime: ClearRuntime, radius: float, name: str = "", text_first: bool = True,
                 down_factor: int | None = None):
        super().__init__(runtime, radius, name, down_factor)
        object.__setattr__(self, "original", original)  # a plain attribute even when the stock processor is a module
        self.text_first = text_first
        # Attention modules read the processor's __call__ signature to filter their kwargs.
        def call(attn, *args, **kwargs):
            return self._call(attn, *args, **kwargs)

        self.__call__ = functools.wraps(original.__call__)(call)

    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, *args, **kwargs)

    def _call(self, attn, *args, **kwargs):
        with _RouteSDPA(self):
            return self.original(attn, *args, **kwargs)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """scaled_dot_product_attention's signature, (batch, heads, tokens, head_dim) layout."""
        if dropout_p or is_causal or (enable_gqa and key.shape[1] != query.shape[1]):
            raise ValueError(f"{type(self.original).__name__}: CLEAR supports plain attention only "
                             f"(dropout_p={dropout_p}, is_causal={is_causal}, enable_gqa={enable_gqa})")
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, scale)
        return out.transpose(1, 2)

    def __getattr__(self, name):  # diffusers reads backend settings off its processors
        try:
            return super().__getattr__(name)  # the module's own parameters and submodules
        except AttributeError:
            if name == "original" or "original" not in self.__dict__:
                raise
        return getattr(self.original, name)

    def __repr__(self):
        return (f"ClearSDPAProcessor({type(self.original).__name__}, radius={self.radius:g}, "
                f"backend={self.runtime.backend!r}{self._down()})")


def clear_processor_for(family, processor) -> type[ClearProcessorBase] | None:
    """The family's dedicated CLEAR processor for this stock processor, or None (generic route).
    Exact classes only: a subclass may change the math."""
    return family.processors.get(type(processor)) if family is not None else None
