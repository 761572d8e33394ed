"""FP8 linear layers for a (CLEAR) model: torchao's float8 dynamic activation + weight quantization with
row-wise scales, in place, on the transformer's linear layers except those its family keeps in high
precision (embedders, final projection: ``ModelFamily.keep_high_precision``). On Hopper the tensor cores run
e4m3 at twice the bf16 rate; attention is untouched (CLEAR's kernels run as before). torchao is an optional
dependency (``pip install "clear-surgery[fp8]"``)."""

from __future__ import annotations

import fnmatch

import torch

from clear_surgery.surgery import family_of
from clear_surgery.surgery.core.errors import InvalidValueError, MissingDependencyError, MissingHardwareError

QUANTIZE = ("fp8",)
FP8_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later


def check_quantize(option: str, quantize: str | None, device: str | torch.device | None = None) -> None:
    """One error for a value that is not a quantization, or a device without FP8 tensor cores."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise InvalidValueError(f"{option} must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    reason = fp8_reason(device)
    if reason:
        raise MissingHardwareError(f"{option} {quantize}: {reason}")


def fp8_reason(device: str | torch.device | None) -> str | None:
    """Why FP8 matrix multiplies cannot run on ``device`` (None: they can)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return f"FP8 linear layers need a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); this runs on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no FP8 "
                "tensor cores (8.9 or newer: Ada, Hopper)")
    return None


def check_fp8_attention(option: str, enabled: bool, device: str | torch.device | None = None) -> None:
    """One error where FP8 attention cannot run: the gluon-fp8 kernel is Hopper's (sm_90 wgmma)."""
    if not enabled:
        return
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        raise MissingHardwareError(f"{option}: FP8 attention runs on Hopper GPUs (the gluon-fp8 kernel, sm_90); this "
                                   f"runs on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability[0] != 9:
        raise MissingHardwareError(f"{option}: FP8 attention runs on Hopper GPUs (sm_90); "
                                   f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}")


def fp8_attention_pipeline(pipe) -> list[str]:
    """Ask the pipeline's CLEAR models (transformer, ControlNet) for FP8 attention (image queries in e4m3 where
    the gluon-fp8 backend takes the call); returns the parts asked. A pipeline without CLEAR attention is an
    error: FP8 attention is CLEAR's kernel."""
    from clear_surgery.surgery import get_clear_state

    asked = []
    for part in ("transformer", "controlnet"):
        model = getattr(pipe, part, None)
        state = get_clear_state(model) if model is not None else None
        if state is not None:
            state.runtime.fp8_attention = True
            asked.append(part)
    if not asked:
        raise InvalidValueError("FP8 attention: the pipeline has no CLEAR attention (convert the model, or pass --radius)")
    return asked


def fp8_targets(model: torch.nn.Module) -> list[str]:
    """The linear layers ``quantize_linear_layers`` turns to FP8: every ``nn.Linear`` except those the model's
    family keeps in high precision."""
    family = family_of(model)
    keep = family.keep_high_precision
    if keep is None:
        raise InvalidValueError(f"FP8 linear layers: the {family.name} family has no rule yet for which layers stay in "
                                "high precision (FLUX.1 and SD3.x have one)")
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in keep)]


def quantize_linear_layers(model: torch.nn.Module, quantize: str = "fp8") -> list[str]:
    """Turn ``model``'s linear layers (``fp8_targets``) into FP8 in place; returns their names. The model must
    sit on a GPU with FP8 tensor cores."""
    parameter = next(model.parameters())
    check_quantize("quantize", quantize, parameter.device)
    targets = set(fp8_targets(model))
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as err:
        raise MissingDependencyError('FP8 linear layers need torchao: pip install "clear-surgery[fp8]"') from err
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in targets)
    return sorted(targets)


def quantize_pipeline(pipe, quantize: str | None) -> list[str]:
    """The pipeline's transformer (and ControlNet) with FP8 linear layers; nothing when ``quantize`` is None."""
    done = []
    for part in ("transformer", "controlnet"):
        model = getattr(pipe, part, None)
        if quantize is not None and model is not None:
            done += [f"{part}.{name}" for name in quantize_linear_layers(model, quantize)]
    return done
