"""The in-place verb: turn a model's joint attention into CLEAR attention, and undo it."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math

import torch

from .analysis import AnalysisReport, AttentionSite, analyze
from .config import ClearConfig, runtime_backend
from .errors import ClearSurgeryError, InvalidValueError
from .families import ModelFamily, family_of
from .processors import ClearRuntime, ClearSDPAProcessor, Route, clear_processor_for
from .state import ClearState, attach, detach, get_clear_state, require_clear_state
from .tiling import TileLayout


class NoJointAttentionError(InvalidValueError):
    pass


class RewriteError(ClearSurgeryError, RuntimeError):
    """The model cannot be rewritten (its forward does not re-trace with CLEAR as analyzed)."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convertible(site: AttentionSite, config: ClearConfig) -> bool:
    """Whether ``config`` can turn ``site`` into CLEAR: a supported joint site, or, with
    image_attention='local', an image-only self-attention call of a diffusers attention module."""
    return site.supported or (config.image_attention == "local" and site.kind == "image" and site.op == "sdpa"
                              and site.processor is not None)


def select_sites(report: AnalysisReport, config: ClearConfig) -> list[AttentionSite]:
    """The sites ``config`` asks to convert; every problem is reported together, before any change."""
    local = [s for s in report.sites if s.kind == "image" and convertible(s, config)]
    if not report.joint_sites and not local:
        found = "; ".join(f"{s.module}: {s.reason}" for s in report.sites[:8])
        raise NoJointAttentionError(f"{report.model_class} has no joint text-image attention to convert: found "
                                    f"{report.describe()}{': ' + found if found else ''}")
    problems = []
    for option, patterns in (("target_modules / --target", config.target_modules or []),
                             ("exclude_modules / --exclude", config.exclude_modules)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(s.module, pattern) for s in report.sites):
                problems.append(f"{option} pattern {pattern!r} matches no attention module")
    if config.target_modules is None:
        chosen = [s for s in report.sites if s in report.joint_sites or s in local]
    else:
        chosen = [s for s in report.sites if _matches(s.module, config.target_modules)]
    chosen = [s for s in chosen if not _matches(s.module, config.exclude_modules)]
    problems += [f"{s.module}: {s.reason}" for s in chosen if not convertible(s, config)]
    for pattern in config.radius_overrides:
        if not any(fnmatch.fnmatchcase(s.module, pattern) for s in chosen):
            problems.append(f"radius_overrides / --radius-for pattern {pattern!r} matches no converted attention "
                            "module")
    if problems:
        unsupported = any(not convertible(s, config) for s in chosen)
        hint = (" (leave unsupported sites dense: exclude_modules in ClearConfig, --exclude on the command line)"
                if unsupported else "")
        raise InvalidValueError(f"cannot convert to CLEAR{hint}:\n  " + "\n  ".join(problems))
    if not chosen:
        raise InvalidValueError("target_modules / exclude_modules (--target / --exclude) leave no attention site "
                                "to convert")
    return chosen


def _grid_hook(family: ModelFamily, runtime: ClearRuntime):
    def hook(model, args, kwargs):
        runtime.grid, runtime.images = family.grids(model, args, kwargs)

    return hook


def apply_clear(model: torch.nn.Module, config: ClearConfig, *, backend: str = "auto",
                analysis: AnalysisReport | None = None, verify: bool = True,
                provenance: dict | None = None) -> AnalysisReport:
    """Convert ``model``'s joint attention to CLEAR, in place; returns the analysis of the result.

    All targets are validated before anything changes. Weights and state-dict keys are untouched
    (only attention processors are swapped), so ``remove_clear`` restores the model exactly.
    With ``verify`` the model is traced again: every target must now be a ``clear::attention``
    node and every other compute op must be unchanged, otherwise the rewrite is undone.
    ``backend``: which backend runs the op ('auto' or a name of ``clear_surgery.plugins.backend_names()``), a
    run-time choice kept apart from the config (``set_backend`` changes it later).
    ``analysis``: the model's analysis when the caller has it (skips a trace); ``provenance``: how
    the model's CLEAR tensors were made, kept in its state for saving.
    The result is readable with ``get_clear_state(model)``.
    """
    if get_clear_state(model) is not None:
        raise ValueError("model already has CLEAR attention; call remove_clear(model) first")
    backend = runtime_backend(backend)
    family = family_of(model)  # resolved once, handed to every step below
    if config.token_layout == "tiled" and not family.tileable:
        raise ValueError(f"token_layout='tiled' is not available for {type(model).__name__} (its image tokens are "
                         "made inside the model where the tile layout does not hook in); use token_layout='raster'")
    before = analysis if analysis is not None else analyze(model, family=family)
    targets = select_sites(before, config)

    runtime = ClearRuntime(backend=backend)
    _install_processors(model, family, targets, runtime, config.radius_for, config.down_factor)
    attach(model, ClearState(config=config, family=family, sites=[s.module for s in targets], analysis=before,
                             runtime=runtime, provenance=provenance))
    try:
        # The re-trace checks the processors' math in raster order; the tile layout only adds
        # permutations at the model's edges (checked by output equality in the tests).
        after = verify_rewrite(model, family, before, {s.module for s in targets},
                                               config.down_factor or 1) if verify else before
        if config.token_layout == "tiled":
            runtime.tile = tuple(config.tile_shape or default_tile(targets[0].head_dim, config.radius))
            runtime.hooks.append(TileLayout(model, family, runtime, runtime.tile))
    except Exception:
        remove_clear(model)
        raise
    return after


def _install_processors(model, family: ModelFamily, targets: list[AttentionSite], runtime: ClearRuntime, radius_for,
                        down_factor: int | None = None) -> None:
    """CLEAR processors on ``targets`` sharing ``runtime``, and the hook that reads each call's image grid."""
    for site in targets:
        module = model.get_submodule(site.module)
        original = module.processor
        # other sites take the generic route: a family's dedicated processor builds joint attention
        dedicated = clear_processor_for(family, original) if site.kind == "joint" else None
        args = (runtime, radius_for(site.module), site.module)
        runtime.originals[site.module] = original
        # no dedicated CLEAR processor: route the stock processor's SDPA call (checked by the re-trace)
        processor = (dedicated(*args, down_factor=down_factor) if dedicated else
                     ClearSDPAProcessor(original, *args, site.order == "text_first", down_factor=down_factor))
        processor.padding_after_image = site.packed and family.packed.padding_after_image
        weight = next(module.parameters(), None)  # the down variant's spatial_weight: the attention's dtype/device
        module.set_processor(processor.to(weight.device, weight.dtype) if weight is not None else processor)
    runtime.hooks.append(model.register_forward_pre_hook(_grid_hook(family, runtime), with_kwargs=True))


def _restore(model, runtime: ClearRuntime) -> None:
    for name, processor in runtime.originals.items():
        model.get_submodule(name).set_processor(processor)
    for hook in runtime.hooks:
        hook.remove()


@contextlib.contextmanager
def observe_attention(model: torch.nn.Module, observer: Route, *, analysis: AnalysisReport | None = None,
                      image_attention: str = "dense"):
    """Inside the block every joint attention call of the (dense, unconverted) ``model`` goes to
    ``observer(call, proceed)``, which answers it (``call`` is an ``AttentionCall``: q, k, v, text length,
    image grid); with ``image_attention='local'`` its image-only self-attention calls too (text length 0).
    The model is not converted and comes back exactly as it was."""
    if get_clear_state(model) is not None:
        raise ValueError(f"{type(model).__name__} has CLEAR attention already: observe its dense model")
    family = family_of(model)
    report = analysis if analysis is not None else analyze(model, family=family)
    runtime = ClearRuntime()
    runtime.add_route("observer", observer)
    targets = select_sites(report, ClearConfig(radius=1, image_attention=image_attention))
    _install_processors(model, family, targets, runtime, lambda name: math.inf)
    try:
        yield report
    finally:
        _restore(model, runtime)


def set_backend(model: torch.nn.Module, backend: str, *, fp8_attention: bool | None = None) -> None:
    """Choose which backend runs a converted model's CLEAR attention from now on ('auto' or a backend name).
    ``fp8_attention``: ask for FP8 (e4m3) attention where a backend has it (gluon-fp8 on Hopper GPUs: the image
    queries; every other call runs as before); None keeps the current choice."""
    runtime = require_clear_state(model, "choose its backend").runtime
    runtime.backend = runtime_backend(backend)
    if fp8_attention is not None:
        runtime.fp8_attention = bool(fp8_attention)


def default_tile(head_dim: int, radius: float) -> tuple[int, int]:
    """The triton kernel's tile for this head dim and radius; (8, 16) (one FlexAttention block) otherwise."""
    from clear_surgery.plugins.triton_backend import HEAD_DIMS, kernel_config

    return kernel_config(head_dim, radius).tile if head_dim in HEAD_DIMS else (8, 16)


def verify_rewrite(model, family: ModelFamily, before: AnalysisReport, targets: set[str],
                   grid_multiple: int = 1) -> AnalysisReport:
    if before.method != "torch.export":  # a run-time analysis has no graph to compare: compare outputs
        verify_outputs(model, family, grid_multiple)
        return before
    after = analyze(model, family=family, run_time_fallback=False, grid_multiple=grid_multiple)
    problems = []
    if [s.module for s in after.sites] != [s.module for s in before.sites]:
        problems.append("the attention sites changed")
    for old, new in zip(before.sites, after.sites):
        expected = "clear" if old.module in targets else old.op
        if new.op != expected:
            problems.append(f"{new.module}: expected {expected}, traced {new.op}")
    if after.op_counts != before.op_counts:
        diff = {k: (before.op_counts.get(k, 0), after.op_counts.get(k, 0))
                for k in set(before.op_counts) | set(after.op_counts)
                if before.op_counts.get(k, 0) != after.op_counts.get(k, 0)}
        problems.append(f"compute ops besides attention changed (before, after): {diff}")
    if problems:
        raise RewriteError("CLEAR rewrite check failed, rewrite undone:\n  " + "\n  ".join(problems))
    return after


def verify_outputs(model, family: ModelFamily, grid_multiple: int = 1) -> None:
    """The check of a rewrite without a graph (models analyzed at run time): the example call through CLEAR at a
    radius that covers its whole grid must equal the dense model's (then CLEAR is exactly the stock attention
    and only the window differs), and through CLEAR at the configured radii it must give finite outputs."""
    from .families import EXAMPLE_GRID, example_inputs

    runtime = get_clear_state(model).runtime
    inputs = example_inputs(model, grid=(EXAMPLE_GRID[0] * grid_multiple, EXAMPLE_GRID[1] * grid_multiple),
                            family=family)

    def covering(call, proceed):  # no two tokens are farther apart than the call has tokens
        return proceed(dataclasses.replace(call, radius=float(call.tokens())))

    with torch.no_grad():
        with dense_attention(model):
            want = flat_output(model(**inputs)).double()
        with runtime.routed("verify: covering radius", covering):
            got = flat_output(model(**inputs)).double()
        local = flat_output(model(**inputs))
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    tolerance = 1e-4 if local.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tolerance:
        raise RewriteError(f"CLEAR rewrite check failed, rewrite undone: at a radius covering the example grid the "
                           f"model differs from its dense self by {err:.2e} (over {tolerance:g})")
    if not bool(local.isfinite().all()):
        raise RewriteError("CLEAR rewrite check failed, rewrite undone: the example call's output at the configured "
                           "radii is not finite")


def flat_output(out) -> torch.Tensor:
    """A model call's output as one flat tensor (its first output: a tensor, or a list of them)."""
    first = out[0] if isinstance(out, (tuple, list)) and not isinstance(out, torch.Tensor) else out
    first = getattr(first, "sample", first)
    return torch.cat([t.flatten() for t in first]) if isinstance(first, (tuple, list)) else first.flatten()


def remove_clear(model: torch.nn.Module) -> None:
    """Undo ``apply_clear``: the original processors come back."""
    state = get_clear_state(model)
    if state is None:
        raise ValueError("model has no CLEAR attention to remove")
    _restore(model, state.runtime)
    detach(model)


@contextlib.contextmanager
def dense_attention(model: torch.nn.Module):
    """Run a CLEAR model with its original dense processors inside the block (the distillation
    teacher shares every weight with the student this way); CLEAR comes back afterwards."""
    state = get_clear_state(model)
    if state is None:
        raise ValueError("model has no CLEAR attention")
    runtime = state.runtime
    clear = {name: model.get_submodule(name).processor for name in runtime.originals}
    try:
        for name, processor in runtime.originals.items():
            model.get_submodule(name).set_processor(processor)
        yield model
    finally:
        for name, processor in clear.items():
            model.get_submodule(name).set_processor(processor)
