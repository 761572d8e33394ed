"""What a model family is: the facts clear-surgery needs about one architecture, in one object.

Each module of this package describes one family (its model classes, example inputs for tracing,
where a call's image grid comes from, its dedicated CLEAR processors, where the tile layout hooks
in, its pipelines, built-in tiny models and distillation sample adapter) and exposes it as
``FAMILY``. The grid is read from each actual call, so one converted model runs at any resolution.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from clear_surgery.surgery.core.errors import InvalidValueError

_GRID_OVERRIDE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "clear_grid", default=None)


@contextlib.contextmanager
def image_grid(height: int, width: int):
    """Fix the image-token grid for calls inside this block (needed when tracing FLUX models,
    whose grid otherwise comes from the values of ``img_ids``)."""
    # sizes traced symbolically (torch.export with dynamic shapes) stay symbolic
    token = _GRID_OVERRIDE.set(tuple(v if isinstance(v, torch.SymInt) else int(v) for v in (height, width)))
    try:
        yield
    finally:
        _GRID_OVERRIDE.reset(token)


def fixed_grid() -> tuple[int, int] | None:
    """The grid fixed by an enclosing ``image_grid`` block, or None."""
    return _GRID_OVERRIDE.get()


class GridError(InvalidValueError):
    pass


@functools.cache
def forward_signature(cls):
    return inspect.signature(cls.forward)


def takes_control_image(model) -> bool:
    """A ControlNet: its forward takes ``controlnet_cond``."""
    return "controlnet_cond" in forward_signature(type(model)).parameters


def bound_arguments(model, args, kwargs) -> dict:
    """forward's arguments of one call, by name."""
    return dict(forward_signature(type(model)).bind_partial(*args, **kwargs).arguments)


# --- grid readers shared by several families --------------------------------------------------


def grid_from_ids(model, bound: dict) -> tuple[int, int]:
    """FLUX-style: rows and columns of the image grid in columns 1 and 2 of ``img_ids``; with several
    images (FLUX.1 Kontext: the reference image's ids have 1 in column 0), the first image's."""
    return _image_grids(model, bound)[0]


def images_from_ids(model, bound: dict) -> tuple[tuple[int, int], ...]:
    """The grids of the images after the first in ``img_ids`` (each a run of one value in column 0)."""
    return _image_grids(model, bound)[1:]


def _image_grids(model, bound: dict) -> tuple[tuple[int, int], ...]:
    ids = bound.get("img_ids")
    if ids is None:
        raise GridError(f"{type(model).__name__} was called without img_ids; CLEAR needs them for the image grid")
    ids = ids[0] if ids.ndim == 3 else ids
    if torch.compiler.is_compiling() or isinstance(ids, torch._subclasses.FakeTensor):
        return (grid_of_ids(ids, "img_ids"),)  # raises with the way out (image_grid)
    starts = [0] + (torch.nonzero(ids[1:, 0] != ids[:-1, 0])[:, 0] + 1).tolist() + [ids.shape[0]]
    return tuple(grid_of_ids(ids[a:b], "img_ids" if len(starts) == 2 else f"img_ids of image {i + 1}")
                 for i, (a, b) in enumerate(zip(starts, starts[1:])))


def grid_of_ids(ids: torch.Tensor, name: str) -> tuple[int, int]:
    """The raster grid whose rows and columns columns 1 and 2 of position ids ``ids`` (tokens, axes) count."""
    if torch.compiler.is_compiling() or isinstance(ids, torch._subclasses.FakeTensor):
        raise GridError(f"the image grid comes from the values of {name}, which tracing cannot read: wrap the call "
                        "in clear_surgery.surgery.image_grid(height, width)")
    # Width = tokens before the row id first changes (rows 0 and 1 are exact in any dtype; ids
    # of large grids are not exact in bf16, so the check below compares in the ids' own dtype).
    count = ids.shape[0]
    changed = torch.nonzero(ids[:, 1] != ids[0, 1])
    width = int(changed[0, 0]) if len(changed) else count
    height = count // width
    index = torch.arange(count, device=ids.device)
    expected = torch.stack([index // width, index % width], dim=1).to(ids.dtype)
    if height * width != count or not torch.equal(ids[:, 1:3], expected):
        raise GridError(f"{name} are not a raster grid starting at 0 (e.g. extra reference-image tokens); "
                        "CLEAR needs one image grid: pass it with clear_surgery.surgery.image_grid(h, w)")
    return height, width


def packed_tokens(model, bound: dict) -> int:
    return bound["hidden_states"].shape[1]


def grid_from_latent(model, bound: dict) -> tuple[int, int]:
    """Latent-input models (SD3, CogView, ...): the 4-D latent divided by the patch size (one number, or
    one per side)."""
    hidden = bound.get("hidden_states")
    if hidden is None or hidden.ndim != 4:
        raise GridError(f"{type(model).__name__}: expected 4-D latent hidden_states to read the image grid")
    patch = model.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[-2:]
    return hidden.shape[-2] // ph, hidden.shape[-1] // pw


def latent_tokens(model, bound: dict) -> int:
    height, width = grid_from_latent(model, bound)
    return height * width


def flux_like_inputs(model, text_len, height, width, batch, dtype, device) -> dict:
    """FLUX-style call (packed tokens, img_ids / txt_ids with one column per RoPE axis, rows and
    columns in axes 1 and 2), built from the config and forward's signature."""
    cfg = model.config
    params = forward_signature(type(model)).parameters
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
    if "text_encoder_layers" in params:  # Bria FIBO: one text-encoder layer per block
        layers = cfg.num_layers + cfg.num_single_layers
        inputs["text_encoder_layers"] = [t(batch, text_len, cfg.text_encoder_dim) for _ in range(layers)]
    return inputs


@dataclass(frozen=True)
class TilePlan:
    """Where image tokens enter and leave a model, for the tile token layout (see tiling.py).

    entry_tensors / entry_lists: forward arguments holding (batch, image tokens, channels) tensors
    (or lists of them) to permute on entry; ids: the argument of per-token position ids;
    token_modules: submodules whose outputs are the image token stream (patch embedders);
    exit_modules: submodules whose outputs go back to raster order (the last per-token op before
    unpatchify). Every (batch, image tokens, channels) tensor the model returns is permuted back.
    """

    entry_tensors: tuple[str, ...] = ()
    entry_lists: tuple[str, ...] = ()
    ids: str | None = None
    token_modules: tuple[str, ...] = ()
    exit_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackedSequence:
    """Text and image joined once, before the blocks, into one sequence (Lumina2, Z-Image, Ideogram 4): the
    graph shows no join at the attention calls, so the family declares it. In the block stacks ``stacks``
    (module-name prefixes) a self-attention call over more tokens than the image's is joint, with the image's
    tokens ``order`` ("text_first": last, "image_first": first) and every other token global: captions,
    padding, learned pad tokens (every query sees them where the model's mask lets it, they see every key).
    ``padding_after_image``: a batch of samples of unequal text length is padded after each sample's image
    ([text_i, image, padding]); CLEAR moves each sample's padding in front of its image for the call."""

    order: str
    stacks: tuple[str, ...]
    padding_after_image: bool = False

    def covers(self, module: str) -> bool:
        return any(module == s or module.startswith(s + ".") for s in self.stacks)


@dataclass(frozen=True)
class ExportPlan:
    """How a family's models become engines (ONNX, TensorRT, AOTInductor).

    wrap(model) -> a module whose forward takes tensors only, with the image grid visible in input
    shapes (so one exported file serves every resolution); inputs(model, text_len, height, width,
    batch, dtype, device) -> its example kwargs for a grid of height x width tokens; grid_dims(model)
    -> {input name: ((dim, tokens per unit), (dim, tokens per unit))}: which input dims are the grid's
    rows and columns, and how many of their units make one token (SD3: 2 latent pixels per token);
    pixels_per_token: image pixels per token side; text_len: the usual text length of the family.
    """

    wrap: Callable[[object], object]
    inputs: Callable[..., dict]
    grid_dims: Callable[[object], dict]
    output_names: Callable[[object], list]
    pixels_per_token: int = 16
    text_len: int = 512


@dataclass(frozen=True)
class ModelFamily:
    """Everything family-specific. Only ``name``, ``class_names``, ``example_inputs``,
    ``grid_from_call`` and ``image_tokens`` are needed to analyze and convert; the rest switches
    features on (tile layout, pipelines, built-ins, distillation)."""

    name: str
    class_names: tuple[str, ...]
    # (model, text_len, height, width, batch, dtype, device) -> forward kwargs of an example call
    example_inputs: Callable[..., dict]
    grid_from_call: Callable[[object, dict], tuple[int, int]]  # (model, bound forward args) -> grid
    image_tokens: Callable[[object, dict], int]  # (model, bound forward args) -> image tokens of the call
    # (model, bound forward args) -> grids of further images after the first (Kontext's references); None: one
    images_from_call: Callable[[object, dict], tuple[tuple[int, int], ...]] | None = None
    # stock processor class -> dedicated CLEAR processor (exact classes; others take the generic route)
    processors: Mapping[type, type] = field(default_factory=dict)
    tile_plan: TilePlan | None = None  # None: the tile layout is refused for this family
    pipelines: Mapping[str, str] = field(default_factory=dict)  # model class -> diffusers pipeline class
    latent_packing: int = 1  # latent pixels per token side (FLUX packs 2x2 latents into one token)
    pipeline_kwargs: Callable[[object], dict] | None = None  # extra kwargs of a pipeline call
    builtins: Mapping[str, tuple[str, dict]] = field(default_factory=dict)  # tiny name -> (class, config)
    tiny_pipeline: Callable[[str], object] | None = None  # tiny name -> a whole pipeline
    samples: type | None = None  # distillation: cached samples <-> transformer inputs
    export_plan: ExportPlan | None = None  # engines (ONNX, TensorRT, AOTInductor); None: not exportable
    controlnets: tuple[str, ...] = ()  # which of class_names are ControlNets (run beside a transformer)
    # distillation's official attention loss: every 4th attention of the first of these block stacks it has
    loss_stacks: tuple[str, ...] = ("transformer_blocks",)
    # row of the coverage table -> a built-in's name or a builder of (model, example call[, text, image tokens])
    tiny_models: Mapping[str, object] = field(default_factory=dict)
    real_configs: Mapping[str, dict] = field(default_factory=dict)  # full-size configs by name (benchmarks)
    # FP8 linear layers: fnmatch patterns of the linear layers kept in high precision (embedders, final
    # projection); None: no rule yet, FP8 refused
    keep_high_precision: tuple[str, ...] | None = None
    # model -> tokens the model joins with the text besides the prompt's (AuraFlow's registers): CLEAR treats
    # them as text (every query sees them, they see every key); None: none
    global_tokens: Callable[[object], int] | None = None
    packed: PackedSequence | None = None  # text and image joined before the blocks (see PackedSequence)
    # model -> None: empty what the model caches lazily on its first call (Z-Image's RoPE table) before a trace,
    # so the analysis and the rewrite's re-trace see the same graph whether or not the model ran in between
    fresh_for_trace: Callable[[object], None] | None = None
    order: int = 100  # position in listings

    @property
    def tileable(self) -> bool:
        return self.tile_plan is not None

    def grids(self, model, args, kwargs) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
        """The call's first image grid and the grids of further images (none unless the family reads
        them), checked against the number of image tokens the call carries."""
        bound = bound_arguments(model, args, kwargs)
        fixed = _GRID_OVERRIDE.get()
        grid = fixed or self.grid_from_call(model, bound)
        images = () if fixed or self.images_from_call is None else self.images_from_call(model, bound)
        tokens = self.image_tokens(model, bound)
        total = grid[0] * grid[1] + sum(h * w for h, w in images)
        if total != tokens:
            shown = " + ".join(f"{h}x{w}" for h, w in (grid, *images))
            raise GridError(f"image grid {shown} = {total} tokens does not match the {tokens} image tokens of this call")
        return grid, images

    def pipeline_for(self, model_class: str) -> str | None:
        return self.pipelines.get(model_class)

    def call_kwargs(self, pipe) -> dict:
        return self.pipeline_kwargs(pipe) if self.pipeline_kwargs else {}
