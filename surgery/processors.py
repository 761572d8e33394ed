"""CLEAR attention processors: the stock diffusers processors' math with the attention call
replaced by ``clear::attention``. Modules keep their weights (state-dict keys unchanged).

Here: the runtime shared by a model's processors, the base class of the dedicated processors (each
lives in its family's module) and the generic route for any stock processor."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from clear_surgery.plugins import attention, spatial_weight_shape


@dataclass
class ClearRuntime:
    """Per-model state shared by its CLEAR processors: the current call's image grid and the run-time
    choices (the backend) that are not part of the saved config."""

    backend: str = "auto"  # which backend of clear_surgery.plugins runs the op (set_backend changes it)
    grid: tuple[int, int] | None = None
    images: tuple[tuple[int, int], ...] = ()  # further images' grids in the current call (FLUX.1 Kontext)
    tile: tuple[int, int] | None = None  # tile token layout, None: raster
    originals: dict = field(default_factory=dict)  # module name -> replaced processor (for undo)
    hooks: list = field(default_factory=list)
    observer: object = None  # set by the locality profiler: sees q/k of every call, attention stays dense
    proportional_attention: bool = False  # scale = sqrt(log_4608(tokens) / head_dim), for resolution extrapolation
    band: object = None  # patch parallel (surgery/patch_parallel.py): this rank's rows of the image, or None

    def current_grid(self) -> tuple[int, int]:
        if self.grid is None:
            raise RuntimeError("CLEAR processor called outside its model's forward: no image grid is set")
        return self.grid


class ClearProcessorBase(torch.nn.Module):
    """A module, as the official "down" processor is: with ``down_factor`` it owns ``spatial_weight``
    (state-dict key ``<attention>.processor.spatial_weight``, as the official checkpoints name it);
    without, it holds no tensor and the model's state dict is the stock one."""

    text_first: bool  # segment order the processor builds

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
        height, width = self.runtime.current_grid()
        images = self.runtime.images
        text_len = query.shape[1] - height * width - sum(h * w for h, w in images)
        if self.runtime.observer is not None:
            return self.runtime.observer(self, query, key, value, text_len, height, width, images)
        band = self.runtime.band
        if band is not None and (self.down_factor or attention_mask is not None or images):
            raise ValueError("patch parallelism runs plain CLEAR only: not the 'down' variant (its pooled keys need "
                             "the whole image on every rank), text padding masks or several images")
        if self.runtime.proportional_attention:  # the official high-resolution setting (4608 = 1024² FLUX tokens)
            tokens = query.shape[1] if band is None else band.text_len(query) + height * width  # the whole image's
            scale = math.sqrt(math.log(tokens, 4608) / query.shape[-1])
        if band is not None:  # patch parallel: this rank holds the text and one band of image rows
            return band.attend(query, key, value, self.text_first, self.radius, self.runtime.backend, scale)
        return attention(query, key, value, text_len=text_len, text_first=self.text_first, height=height,
                         width=width, radius=self.radius, backend=self.runtime.backend, tile=self.runtime.tile, scale=scale,
                         pool_weight=self.spatial_weight if self.down_factor else None, attn_mask=attention_mask,
                         images=images)

    def _down(self) -> str:
        return f", down_factor={self.down_factor}" if self.down_factor else ""

    def __repr__(self):
        return f"{type(self).__name__}(radius={self.radius:g}, backend={self.runtime.backend!r}{self._down()})"


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
