"""CLEAR layers: only the tensors CLEAR changes (by default the attention q/k/v/out projections of
every converted site), saved with clear_config.json naming the base model and radius. This is the
form that transfers between models of one architecture (FLUX.1-dev -> schnell); the official CLEAR
releases (clear_local_{8,16,32}.safetensors) are this form too, without the config."""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import (CLEAR_CONFIG_NAME, atomic_directory, package_version, read_tensor_specs,
                         tensor_mismatches, write_json)

LAYERS_FORMAT = "clear-surgery/clear-layers"
LAYERS_FILE = "clear_layers.safetensors"
# What the official code trains: attention q/k/v/out projections in all blocks.
DEFAULT_TRAINED = ("{site}.to_q.*", "{site}.to_k.*", "{site}.to_v.*", "{site}.to_out.0.*")


class ClearLayersError(ValueError):
    pass


def trained_names(model, patterns=DEFAULT_TRAINED) -> list[str]:
    """State-dict names the patterns select; '{site}' stands for each converted attention module."""
    sites = getattr(model, "_clear_sites", None)
    if sites is None:
        raise ValueError("model has no CLEAR attention: run apply_clear first")
    expanded = [p.format(site=s) for p in patterns for s in sites] if any("{site}" in p for p in patterns) \
        else list(patterns)
    names = [n for n in model.state_dict() if any(fnmatch.fnmatchcase(n, p) for p in expanded)]
    if not names:
        raise ValueError(f"the trained-parameter patterns {list(patterns)} select no tensor of the model")
    return names


def save_clear_layers(model, out: str | os.PathLike, *, trained=DEFAULT_TRAINED, base_model: dict | None = None,
                      overwrite: bool = False, metrics: dict | None = None) -> Path:
    from .model_card import write_model_card

    names = trained_names(model, trained)
    state = model.state_dict()
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        save_file({n: state[n].detach().contiguous().cpu() for n in names}, tmp / LAYERS_FILE,
                  metadata={"format": "pt"})
        meta = {"format": LAYERS_FORMAT, "format_version": 1, "clear_surgery_version": package_version(),
                "config": model._clear_config.to_dict(), "base_model": base_model or {},
                "model_class": type(model).__name__, "trained": list(trained), "sites": list(model._clear_sites),
                "tensors": {n: list(state[n].shape) for n in names}, "metrics": metrics or {}}
        write_model_card(tmp, meta)
        write_json(tmp / CLEAR_CONFIG_NAME, meta)
    return out


def layer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (shape, _) in read_tensor_specs([path]).items()}


def apply_layer_tensors(model, path: str | os.PathLike) -> list[str]:
    """Copy the tensors of a safetensors file into ``model`` (in place) after checking every name and
    shape; returns the names written. Nothing is changed when anything mismatches."""
    path = Path(path)
    found = layer_shapes(path)
    state = model.state_dict()
    expected = {n: tuple(state[n].shape) for n in found if n in state}
    problems = [p for p in tensor_mismatches(expected, found) if not p.startswith("missing")]
    if problems:
        raise ClearLayersError(f"CLEAR layers {path.name} do not fit {type(model).__name__} "
                               f"({len(problems)} problems):\n  " + "\n  ".join(problems[:20])
                               + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(state[name].dtype))
    return sorted(tensors)


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


def resolve_file(source: str, revision: str | None = None) -> Path:
    """A local file, or REPO_ID/FILENAME on the Hub (downloaded to the huggingface_hub cache)."""
    if Path(source).expanduser().is_file():
        return Path(source).expanduser()
    parts = source.split("/")
    if len(parts) < 3:
        raise ClearLayersError(f"no such file: {source} (a Hub file is written OWNER/REPO/FILENAME)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision))
    except Exception as err:
        raise ClearLayersError(f"cannot get {source}: {type(err).__name__}: {str(err).splitlines()[0]}") from err


def read_layers_folder(folder: Path) -> dict:
    from .converted import read_clear_config

    meta = read_clear_config(folder, LAYERS_FORMAT)
    if not (folder / LAYERS_FILE).is_file():
        raise ClearLayersError(f"{folder} has no {LAYERS_FILE}")
    return meta


def load_clear_layers(model, source: str | os.PathLike, *, verify: bool = False):
    """Apply a CLEAR-layers folder (local or Hub repo) to a dense base model: tensors, then attention."""
    from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear

    from .converted import resolve_folder

    folder = resolve_folder(source)
    meta = read_layers_folder(folder)
    apply_clear(model, ClearConfig.from_dict(meta["config"]), verify=verify)  # processors only: undoable
    try:
        model._clear_changed = apply_layer_tensors(model, folder / LAYERS_FILE)
    except Exception:
        remove_clear(model)
        raise
    return model
