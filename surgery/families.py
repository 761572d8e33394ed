"""Model families: how to build example inputs, and where a call's image grid comes from.

The grid (rows, cols of image tokens) is read from each actual call, so one converted model runs
at any resolution. FLUX-style models carry it in ``img_ids``; SD3-style in the latent's shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

_GRID_OVERRIDE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "clear_grid", default=None)


@contextlib.contextmanager
def image_grid(height: int, width: int):
    """Fix the image-token grid for calls inside this block (needed when tracing FLUX models,
    whose grid otherwise comes from the values of ``img_ids``)."""
    token = _GRID_OVERRIDE.set((int(height), int(width)))
    try:
        yield
    finally:
        _GRID_OVERRIDE.reset(token)


class GridError(ValueError):
    pass


def _bound_arguments(model, args, kwargs) -> dict:
    signature = _forward_signature(type(model))
    return signature.bind_partial(*args, **kwargs).arguments


@functools.cache
def _forward_signature(cls):
    return inspect.signature(cls.forward)


def _grid_from_ids(model, args, kwargs) -> tuple[int, int]:
    ids = _bound_arguments(model, args, kwargs).get("img_ids")
    if ids is None:
        raise GridError(f"{type(model).__name__} was called without img_ids; CLEAR needs them for the image grid")
    if ids.ndim == 3:
        ids = ids[0]
    if torch.compiler.is_compiling() or isinstance(ids, torch._subclasses.FakeTensor):
        raise GridError("the image grid of a FLUX model comes from the values of img_ids, which tracing "
                        "cannot read: wrap the call in clear_surgery.surgery.image_grid(height, width)")
    # Width = tokens before the row id first changes (rows 0 and 1 are exact in any dtype; ids
    # of large grids are not exact in bf16, so the check below compares in the ids' own dtype).
    count = ids.shape[0]
    changed = torch.nonzero(ids[:, 1] != ids[0, 1])
    width = int(changed[0, 0]) if len(changed) else count
    height = count // width
    index = torch.arange(count, device=ids.device)
    expected = torch.stack([index // width, index % width], dim=1).to(ids.dtype)
    if height * width != count or not torch.equal(ids[:, 1:3], expected):
        raise GridError("img_ids are not a raster grid starting at 0 (e.g. extra reference-image tokens); "
                        "CLEAR needs one image grid: pass it with clear_surgery.surgery.image_grid(h, w)")
    return height, width


def _grid_from_latent(model, args, kwargs) -> tuple[int, int]:
    hidden = _bound_arguments(model, args, kwargs).get("hidden_states")
    if hidden is None or hidden.ndim != 4:
        raise GridError(f"{type(model).__name__}: expected 4-D latent hidden_states to read the image grid")
    patch = model.config.patch_size
    return hidden.shape[-2] // patch, hidden.shape[-1] // patch


def _packed_tokens(model, args, kwargs) -> int:
    return _bound_arguments(model, args, kwargs)["hidden_states"].shape[1]


def _latent_tokens(model, args, kwargs) -> int:
    height, width = _grid_from_latent(model, args, kwargs)
    return height * width


def _flux_like_inputs(model, text_len, height, width, batch, dtype, device):
    """FLUX-style models (packed tokens, img_ids / txt_ids with one column per RoPE axis, rows and
    columns in axes 1 and 2), built from the config and forward's signature."""
    cfg = model.config
    params = _forward_signature(type(model)).parameters
    axes = len(cfg.axes_dims_rope)
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    inputs = dict(hidden_states=t(batch, height * width, cfg.in_channels),
                  encoder_hidden_states=t(batch, text_len, cfg.joint_attention_dim),
                  timestep=torch.full((batch,), 0.5, dtype=dtype, device=device),
                  img_ids=ids.reshape(-1, axes).to(device=device, dtype=dtype),
                  txt_ids=torch.zeros(text_len, axes, device=device, dtype=dtype), return_dict=False)
    if "pooled_projections" in params and getattr(cfg, "pooled_projection_dim", None):
        inputs["pooled_projections"] = t(batch, cfg.pooled_projection_dim)
    if "guidance" in params and getattr(cfg, "guidance_embeds", False):
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype, device=device)
    return inputs


def _flux_inputs(model, text_len, height, width, batch, dtype, device):
    """FLUX.1 and its ControlNet: the FLUX-style call, plus the control image for a ControlNet."""
    inputs = _flux_like_inputs(model, text_len, height, width, batch, dtype, device)
    if "controlnet_cond" in _forward_signature(type(model)).parameters:
        cfg = model.config
        extra = getattr(cfg, "num_extra_conditioning_channels", 0) or 0
        inputs["controlnet_cond"] = torch.randn(batch, height * width, cfg.in_channels + extra, dtype=dtype,
                                                device=device)
        if getattr(cfg, "num_mode", None):
            inputs["controlnet_mode"] = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return inputs


def _sd3_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    inputs = dict(
        hidden_states=t(batch, cfg.in_channels, height * p, width * p),
        encoder_hidden_states=t(batch, text_len, cfg.joint_attention_dim),
        pooled_projections=t(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 500.0, dtype=dtype, device=device),
        return_dict=False,
    )
    if "controlnet_cond" in _forward_signature(type(model)).parameters:
        extra = getattr(cfg, "extra_conditioning_channels", 0) or 0
        inputs["controlnet_cond"] = t(batch, cfg.in_channels + extra, height * p, width * p)
    return inputs


def _cogview_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    size = torch.tensor([[height * p * 8.0, width * p * 8.0]] * batch, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.text_embed_dim),
                timestep=torch.full((batch,), 500, device=device), original_size=size, target_size=size,
                crop_coords=torch.zeros(batch, 2, dtype=dtype, device=device), return_dict=False)


def _pixart_inputs(model, text_len, height, width, batch, dtype, device):
    # Analysis only: PixArt attends image-to-image and image-to-text (cross), never jointly.
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    return dict(hidden_states=t(batch, cfg.in_channels, height * p, width * p),
                encoder_hidden_states=t(batch, text_len, cfg.caption_channels),
                timestep=torch.full((batch,), 500, device=device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_names: tuple[str, ...]
    example_inputs: Callable[..., dict]
    grid_from_call: Callable[..., tuple[int, int]]

    image_tokens: Callable[..., int]
    tileable: bool = True  # the tile token layout knows where this family's image tokens enter and leave

    @staticmethod
    def bind(model, args, kwargs) -> dict:
        return dict(_bound_arguments(model, args, kwargs))

    def grid(self, model, args, kwargs) -> tuple[int, int]:
        """The call's image grid, checked against the number of image tokens it carries."""
        grid = _GRID_OVERRIDE.get() or self.grid_from_call(model, args, kwargs)
        tokens = self.image_tokens(model, args, kwargs)
        if grid[0] * grid[1] != tokens:
            raise GridError(f"image grid {grid[0]}x{grid[1]} = {grid[0] * grid[1]} tokens does not match the "
                            f"{tokens} image tokens of this call")
        return grid


FAMILIES = (
    ModelFamily("flux", ("FluxTransformer2DModel", "FluxControlNetModel"), _flux_inputs, _grid_from_ids,
                _packed_tokens),
    ModelFamily("sd3", ("SD3Transformer2DModel", "SD3ControlNetModel"), _sd3_inputs, _grid_from_latent,
                _latent_tokens),
    # Their attention processors have no dedicated CLEAR version: the generic one routes their
    # single SDPA call (the rewrite's re-trace checks that nothing else changed).
    ModelFamily("flux-like", ("Flux2Transformer2DModel", "Flux3Transformer2DModel", "BriaTransformer2DModel",
                              "LongCatImageTransformer2DModel", "OvisImageTransformer2DModel"),
                _flux_like_inputs, _grid_from_ids, _packed_tokens),
    ModelFamily("cogview", ("CogView4Transformer2DModel", "CogView3PlusTransformer2DModel"), _cogview_inputs,
                _grid_from_latent, _latent_tokens, tileable=False),
    ModelFamily("pixart", ("PixArtTransformer2DModel",), _pixart_inputs, _grid_from_latent, _latent_tokens,
                tileable=False),
)


def family_of(model) -> ModelFamily:
    name = type(model).__name__
    for family in FAMILIES:
        if name in family.class_names:
            return family
    known = sorted(n for f in FAMILIES for n in f.class_names)
    raise ValueError(f"{name} is not a model family clear-surgery knows; known: {known}. "
                     "Pass example_inputs, text_tokens and image_tokens to analyze() for other models.")


# Example grid used for analysis: small, non-square, and with token counts that match no
# channel size, so text and image streams are told apart by length alone.
EXAMPLE_TEXT_TOKENS = 7
EXAMPLE_GRID = (3, 5)


def example_inputs(model, text_len=EXAMPLE_TEXT_TOKENS, grid=EXAMPLE_GRID, batch=1) -> dict:
    param = next(model.parameters())
    return family_of(model).example_inputs(model, text_len, grid[0], grid[1], batch, param.dtype, param.device)
