"""CLEAR layers: only the tensors CLEAR changes (by default the attention q/k/v/out projections of
every converted site), saved with clear_config.json naming the base model and radius. This is the
form that transfers between models of one architecture (FLUX.1-dev -> schnell); the official CLEAR
releases (clear_local_{8,16,32}.safetensors) are this form too, without the config."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

import torch

from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear
from clear_surgery.surgery.state import require_clear_state

from .atomic import atomic_directory
from .checkpoint import (FORMAT_VERSION, LAYERS_FORMAT, ClearFolderError, listed, package_version,
                         tensor_mismatches)
from .converted import finish_folder, read_clear_config
from .download import resolve_folder
from .safetensors_io import read_header, read_tensor, write_file

LAYERS_FILE = "clear_layers.safetensors"
# What the official code trains: attention q/k/v/out projections in all blocks.
DEFAULT_TRAINED = ("{site}.to_q.*", "{site}.to_k.*", "{site}.to_v.*", "{site}.to_out.0.*")


class ClearLayersError(ValueError):
    pass


def select_names(names, sites, patterns=DEFAULT_TRAINED) -> list[str]:
    """The tensor names the patterns select; '{site}' stands for each converted attention module."""
    expanded = [p.format(site=s) for p in patterns for s in sites] if any("{site}" in p for p in patterns) \
        else list(patterns)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in expanded)]
    if not chosen:
        raise ClearLayersError(f"the trained-tensor patterns {list(patterns)} select no tensor of the model")
    return chosen


def trained_names(model, patterns=DEFAULT_TRAINED) -> list[str]:
    """State-dict names of a CLEAR model that the patterns select."""
    return select_names(model.state_dict(), require_clear_state(model, "select its CLEAR layers").sites, patterns)


def layers_meta(state, model_class_name: str, trained, base_model: dict | None, tensors: dict) -> dict:
    """The clear_config.json of a CLEAR-layers folder."""
    return {"format": LAYERS_FORMAT, "format_version": FORMAT_VERSION, "clear_surgery_version": package_version(),
            "config": state.config.to_dict(), "base_model": base_model or {}, "model_class": model_class_name,
            "trained": list(trained), "sites": list(state.sites),
            "tensors": {n: list(shape) for n, shape in tensors.items()}, "training": state.provenance}


def save_clear_layers(model, out: str | os.PathLike, *, trained=DEFAULT_TRAINED, base_model: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Write the CLEAR layers of ``model`` (the tensors ``trained`` selects) as a folder; how they were
    made (the model's CLEAR state's provenance) goes into clear_config.json and the model card."""
    state = require_clear_state(model, "save its CLEAR layers")
    names = trained_names(model, trained)
    tensors = model.state_dict()
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        write_file(tmp / LAYERS_FILE, [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names],
                   lambda n: tensors[n], metadata={"format": "pt"})
        finish_folder(tmp, layers_meta(state, type(model).__name__, trained, base_model,
                                       {n: tuple(tensors[n].shape) for n in names}))
    return out


def layer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: entry.shape for name, entry in read_header(path).tensors.items()}


def check_layer_fit(expected: dict[str, tuple[int, ...]], path: Path, what: str) -> None:
    """Every tensor of the layers file must exist in the model with the same shape."""
    problems = [p for p in tensor_mismatches(expected, layer_shapes(path)) if not p.startswith("missing")]
    if problems:
        raise ClearLayersError(f"CLEAR layers {path.name} do not fit {what} ({len(problems)} problems):\n  "
                               + listed(problems))


def apply_layer_tensors(model, path: str | os.PathLike) -> list[str]:
    """Copy the tensors of a safetensors file into ``model`` (in place) after checking every name and
    shape; returns the names written. Nothing is changed when anything mismatches."""
    path = Path(path)
    header = read_header(path)
    state = model.state_dict()
    check_layer_fit({n: tuple(t.shape) for n, t in state.items()}, path, type(model).__name__)
    with torch.no_grad():
        for name in header.tensors:  # one tensor in memory at a time
            state[name].copy_(read_tensor(header, name).to(state[name].dtype))
    return sorted(header.tensors)


def file_provenance(path: Path) -> dict:
    """How CLEAR tensors imported from a file were made: the file, by name and content hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"method": "imported CLEAR layers", "file": path.name, "sha256": digest.hexdigest()}


def official_radius(filename: str) -> int:
    """clear_local_16.safetensors -> 16; refuses the *_down_* variants (pooled keys: not built)."""
    name = Path(filename).name
    if "down" in name:
        raise ClearLayersError(f"{name} is a CLEAR 'down' variant: its image queries also attend to pooled key/value "
                               "tokens (spatial_weight), which clear-surgery does not build yet; loading it as plain "
                               "CLEAR would be wrong")
    match = re.search(r"clear_local_(\d+)", name)
    if not match:
        raise ClearLayersError(f"cannot read the radius from {name!r} (expected clear_local_<r>.safetensors); "
                               "pass --radius")
    return int(match.group(1))


def read_layers_folder(folder: Path) -> dict:
    """clear_config.json of a CLEAR-layers folder, checked against its layers file's header."""
    meta = read_clear_config(folder, LAYERS_FORMAT)
    path = Path(folder) / LAYERS_FILE
    if not path.is_file():
        raise ClearFolderError(f"{folder} has no {LAYERS_FILE}")
    if set(layer_shapes(path)) != set(meta.get("tensors", {})):
        raise ClearFolderError(f"{path} does not hold the tensors {Path(folder) / 'clear_config.json'} lists")
    return meta


def load_clear_layers(model, source: str | os.PathLike, *, verify: bool = False, revision: str | None = None):
    """Apply a CLEAR-layers folder (local or Hub repo) to a dense base model: attention, then tensors.
    Every name and shape is checked first; on a mismatch the model is left as it was."""
    folder = resolve_folder(source, revision)
    meta = read_layers_folder(folder)
    check_layer_fit({n: tuple(t.shape) for n, t in model.state_dict().items()}, folder / LAYERS_FILE,
                    type(model).__name__)
    apply_clear(model, ClearConfig.from_dict(meta["config"]), verify=verify, provenance=meta.get("training"))
    try:
        apply_layer_tensors(model, folder / LAYERS_FILE)
    except Exception:
        remove_clear(model)
        raise
    return model
