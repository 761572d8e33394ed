"""A stock diffusers pipeline around a model argument (any form the resolver takes), for the tools
that run whole pipelines: generate, profile, and distillation's teacher samples."""

from __future__ import annotations

import torch

from clear_surgery.surgery.core.errors import InvalidValueError

from clear_surgery.hub import load_model, resolve_model
from clear_surgery.hub.checkpoint import read_tensor_specs, stored_dtype, weight_files
from clear_surgery.hub.resolve import BUILTIN, ModelLoadError, ModelRef
from clear_surgery.surgery import ClearConfig, apply_clear, is_controlnet, tiny_pipeline


def _pipeline_dtype(ref: ModelRef, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of a pipeline: as asked, else the one its transformer's weights are stored in."""
    if dtype is not None:
        return dtype
    return stored_dtype(read_tensor_specs(weight_files(ref.local_folder())))


def _around(base: ModelRef, transformer, what: str):
    """The pipeline of ``base`` with ``transformer`` in place of its own."""
    import diffusers

    if base.kind == BUILTIN:
        pipe = tiny_pipeline(base.source)
        pipe.transformer = transformer
        return pipe
    if base.pipeline is None:
        raise ModelLoadError(f"{what}: its base {base.source} is {base.describe()} with no pipeline around it (text "
                             "encoders, VAE); a pipeline folder or Hub id is needed")
    return diffusers.DiffusionPipeline.from_pretrained(base.pipeline_folder(), transformer=transformer,
                                                       torch_dtype=transformer.dtype)


def load_pipeline(source: str | ModelRef, radius: float | None = None, dtype: torch.dtype | None = None, *,
                  dense: bool = False):
    """The stock pipeline around ``source``: builtin:NAME (a whole tiny pipeline), a pipeline folder or
    Hub id, or a CLEAR folder (its base pipeline with the CLEAR transformer). ``radius`` converts a dense
    model on the fly; ``dense`` gives the dense base pipeline of a CLEAR folder instead (a teacher)."""
    import diffusers

    ref = source if isinstance(source, ModelRef) else resolve_model(source)
    if ref.is_clear and dense:
        ref = ref.base()
    if is_controlnet(ref.model_class):
        raise ModelLoadError(f"{ref.source} is {ref.describe()}: pipelines here are built around a transformer "
                             f"(ControlNet models run inside their pipeline in Python)")
    if ref.is_clear:
        if radius is not None:
            raise ModelLoadError(f"{ref.source} is {ref.describe()} already: drop --radius")
        transformer, _ = load_model(ref, dtype=dtype)
        pipe = _around(ref.base(), transformer, ref.source)
    elif ref.kind == BUILTIN:
        pipe = tiny_pipeline(ref.source)
    elif ref.pipeline is None:
        raise ModelLoadError(f"{ref.source} is {ref.describe()} with no pipeline around it (text encoders, VAE): "
                             "pass the pipeline folder or Hub id")
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(ref.pipeline_folder(), torch_dtype=_pipeline_dtype(ref, dtype))
    if radius is not None:
        apply_clear(pipe.transformer, ClearConfig(radius=radius))
    return pipe


def with_reference_image(pipe):
    """The FLUX.1 Kontext pipeline around ``pipe``'s components: calls then take ``image=`` (a reference
    image whose tokens follow the target's, on a grid of their own)."""
    import diffusers

    if type(pipe).__name__ != "FluxPipeline":
        raise InvalidValueError(f"a reference image needs a FLUX.1 pipeline (FLUX.1 Kontext); got {type(pipe).__name__}")
    return diffusers.FluxKontextPipeline(**pipe.components)


def compile_pipeline(pipe, regional: bool = False) -> list[str]:
    """``torch.compile`` the pipeline's transformer (and ControlNet) in place, after any FP8 or attention setting:
    the first step compiles, later ones run the fused kernels. FP8 linear layers need it to gain: eagerly,
    torchao quantizes each activation in kernels of its own (a slower step than bf16 on an H100,
    recipes/benchmarks). ``regional``: compile each repeated block instead (diffusers' ``compile_repeated_blocks``,
    for models that declare their blocks; others compile whole): one graph per block class, shared by every
    block, so the first step compiles a few graphs instead of the whole model. Returns the parts compiled."""
    done = []
    for part in ("transformer", "controlnet"):
        model = getattr(pipe, part, None)
        if model is None:
            continue
        if regional and getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks()
            done.append(f"{part} (regional)")
        else:
            model.compile()
            done.append(part)
    return done
