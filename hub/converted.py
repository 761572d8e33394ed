"""Converted-model folders: a stock diffusers model folder plus clear_config.json (and, for the
"down" variant, clear_tensors.safetensors with the tensors CLEAR adds: each attention's spatial_weight).

Stock diffusers loads the folder as the dense model; ``load_converted`` loads it with its CLEAR
attention. Folders are written atomically: into a hidden sibling, renamed at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clear_surgery.surgery import AnalysisReport, ClearConfig, apply_clear, clear_tensors, get_clear_state
from clear_surgery.surgery.core.config import runtime_backend, saved_runtime_choices
from clear_surgery.surgery.core.state import require_clear_state

from .atomic import atomic_directory, write_json
from .checkpoint import (CLEAR_CONFIG_NAME, portable_record, FORMAT, FORMAT_VERSION, LAYERS_FORMAT, ClearFolderError, check_specs,
                         package_version, read_json, read_tensor_specs, save_state_dict, skeleton, stored_dtype,
                         weight_files)
from .download import resolve_folder
from .layer_tensors import apply_layer_tensors
from .model_card import write_model_card
from .safetensors_io import write_file

CLEAR_TENSORS_FILE = "clear_tensors.safetensors"


def model_class(name: str | None, where="config"):
    """The diffusers model class a config names."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ClearFolderError(f"{where} names model class {name!r}, which diffusers does not have")
    return cls


def folder_meta(folder_format: str, state, model_class_name: str, base_model: dict | None, **extra) -> dict:
    """The clear_config.json fields every CLEAR folder has (``extra``: the fields of its format)."""
    return {"format": folder_format, "format_version": FORMAT_VERSION, "clear_surgery_version": package_version(),
            "config": state.config.to_dict(), "base_model": base_model or {}, "model_class": model_class_name,
            "sites": list(state.sites), "training": state.provenance, **extra}


def clear_meta(state, model_class_name: str, base_model: dict | None, **extra) -> dict:
    """The clear_config.json of a converted model (``extra``: format-specific fields)."""
    return folder_meta(FORMAT, state, model_class_name, base_model, analysis=state.analysis.to_dict(), **extra)


def finish_folder(tmp: Path, meta: dict) -> None:
    """Model card, then clear_config.json last: a folder with clear_config.json is complete."""
    write_model_card(tmp, meta)
    write_json(tmp / CLEAR_CONFIG_NAME, meta)


def save_converted(model: torch.nn.Module, out: str | os.PathLike, *, base_model: dict | None = None,
                   overwrite: bool = False, max_shard_size: str | int = "10GB") -> Path:
    """Write ``model`` (with CLEAR attention applied) as a diffusers folder + clear_config.json,
    in the dtype its tensors have."""
    state = require_clear_state(model, "save it")
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        model.save_config(tmp)
        own = clear_tensors(model)
        tensors = {n: t for n, t in model.state_dict().items() if n not in own}  # the stock model's, for diffusers
        save_state_dict(tensors, tmp, max_shard_size, desc=f"saving {out.name}")
        write_clear_tensors(tmp, own)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        finish_folder(tmp, clear_meta(state, type(model).__name__, portable_record(base_model or {}, out),
                                      dtype=dtypes))
    return out


def backend_to_run(saved_config: dict, requested: str | None) -> str:
    """The backend a loaded folder runs: the one asked for, else the one an older folder recorded (if this
    machine has it; 'auto' with a warning otherwise), else 'auto'."""
    if requested is not None:
        return runtime_backend(requested)
    return runtime_backend(saved_runtime_choices(saved_config).get("backend"), saved=True)


def write_clear_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """clear_tensors.safetensors in ``folder`` when CLEAR added tensors to the model (else nothing)."""
    if tensors:
        write_file(Path(folder) / CLEAR_TENSORS_FILE, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                   lambda n: tensors[n], metadata={"format": "pt"})


def read_clear_config(folder: Path, expected_format: str | None = FORMAT) -> dict:
    """clear_config.json of a CLEAR folder, its format checked (None: either CLEAR format)."""
    path = Path(folder) / CLEAR_CONFIG_NAME
    if not path.is_file():
        raise ClearFolderError(f"{folder} is not a CLEAR folder: no {CLEAR_CONFIG_NAME}")
    data = read_json(path)
    formats = (FORMAT, LAYERS_FORMAT) if expected_format is None else (expected_format,)
    if data.get("format") not in formats or data.get("format_version") != FORMAT_VERSION:
        raise ClearFolderError(f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}, "
                               f"expected {' or '.join(map(repr, formats))} version {FORMAT_VERSION}")
    try:
        ClearConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ClearFolderError(f"{path}: invalid CLEAR config: {err}") from err
    return data


@dataclass
class ConvertedFolder:
    """A converted folder checked from its headers and configs (no tensor read)."""

    folder: Path
    model_class: type
    config: dict  # config.json
    meta: dict  # clear_config.json
    files: list[Path]
    specs: dict  # tensor name -> (shape, dtype code)

    @property
    def dtype(self) -> torch.dtype | None:
        return stored_dtype(self.specs)


def check_converted_folder(folder: str | os.PathLike) -> ConvertedFolder:
    """Everything about a converted folder that can be checked without loading it: configs, the
    safetensors headers against the model class, the converted sites against the model's modules."""
    folder = Path(folder)
    meta = read_clear_config(folder)
    config = read_json(folder / "config.json")
    cls = model_class(config.get("_class_name"), f"{folder / 'config.json'}")
    files = weight_files(folder)
    if not files:
        raise ClearFolderError(f"{folder} is incomplete: no safetensors weights")
    specs = read_tensor_specs(files)
    meta_model = skeleton(cls, config)
    check_specs(meta_model, specs, folder)
    modules = dict(meta_model.named_modules())
    missing = [s for s in meta.get("sites", []) if not hasattr(modules.get(s), "processor")]
    if missing:
        raise ClearFolderError(f"{folder / CLEAR_CONFIG_NAME} lists sites that are not attention modules of "
                               f"{cls.__name__}: {missing[:5]}")
    if meta["config"].get("down_factor") and not (folder / CLEAR_TENSORS_FILE).is_file():
        raise ClearFolderError(f"{folder} is incomplete: its CLEAR config has down_factor "
                               f"{meta['config']['down_factor']} but there is no {CLEAR_TENSORS_FILE}")
    return ConvertedFolder(folder, cls, config, meta, files, specs)


def load_converted(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, verify: bool = False,
                   revision: str | None = None, device: str | torch.device | None = None, backend: str | None = None):
    """Load a folder written by ``save_converted`` (or a Hub repo of one) into a model with its CLEAR
    attention applied, in the dtype it is stored in unless ``dtype`` says otherwise.

    Names, shapes and sites are checked from the headers first; weights then load shard by shard
    onto the meta-device skeleton (diffusers' low_cpu_mem_usage), never as a second copy. ``backend``: the
    run-time choice (None: what an older folder recorded if this machine has it, else 'auto').
    """
    checked = check_converted_folder(resolve_folder(folder, revision))
    kwargs = {"device_map": str(device)} if device is not None else {}
    model = checked.model_class.from_pretrained(checked.folder, torch_dtype=dtype or checked.dtype,
                                                low_cpu_mem_usage=True, **kwargs).eval()
    meta = checked.meta
    analysis = AnalysisReport.from_dict(meta["analysis"]) if meta.get("analysis") and not verify else None
    apply_clear(model, ClearConfig.from_dict(meta["config"]), backend=backend_to_run(meta["config"], backend),
                analysis=analysis, verify=verify, provenance=meta.get("training"))
    sites = get_clear_state(model).sites
    if sorted(sites) != sorted(meta["sites"]):
        raise ClearFolderError(f"{checked.folder}: clear_config.json lists sites {meta['sites']}, the config selects "
                               f"{sites}")
    if (checked.folder / CLEAR_TENSORS_FILE).is_file():
        apply_layer_tensors(model, checked.folder / CLEAR_TENSORS_FILE)
    return model
