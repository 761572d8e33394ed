"""Resolve --model: a Hub id, a local diffusers folder (pipeline or model), a CLEAR folder, or builtin:NAME."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .builtin import BUILTIN_PREFIX, load_builtin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    pass


@dataclass
class ModelSource:
    id: str
    revision: str | None = None
    subfolder: str | None = None
    model_class: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"config names model class {name!r}, which diffusers does not have")
    return cls


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1


def _load_local(folder: Path, subfolder, dtype, revision):
    from clear_surgery.hub import CLEAR_CONFIG_NAME, load_converted

    if (folder / CLEAR_CONFIG_NAME).is_file() and subfolder is None:
        model = load_converted(folder, dtype=dtype)
        return model, ModelSource(str(folder), None, None, type(model).__name__)
    if subfolder is None and (folder / "model_index.json").is_file():
        subfolder = "transformer"
    model_dir = folder / subfolder if subfolder else folder
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a diffusers model or pipeline folder")
    cls = model_class(_read_json(model_dir / "config.json").get("_class_name"))
    model = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)
    return model, ModelSource(str(folder), revision, subfolder, cls.__name__)


def _load_hub(repo_id, subfolder, dtype, revision):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    from clear_surgery.hub import CLEAR_CONFIG_NAME, load_converted

    try:
        if subfolder is None:
            try:  # a converted CLEAR model on the Hub
                hf_hub_download(repo_id, CLEAR_CONFIG_NAME, revision=revision)
                model = load_converted(repo_id, dtype=dtype, revision=revision)
                return model, ModelSource(repo_id, revision, None, type(model).__name__)
            except EntryNotFoundError:
                pass
            try:
                hf_hub_download(repo_id, "model_index.json", revision=revision)
                subfolder = "transformer"
            except EntryNotFoundError:
                pass
        config_path = hf_hub_download(repo_id, f"{subfolder}/config.json" if subfolder else "config.json",
                                      revision=revision)
    except HFValidationError as err:
        raise ModelLoadError(f"{repo_id!r} is not a local folder, a builtin: model or a valid Hub id: {err}") from err
    except Exception as err:  # not found, gated, offline, no network: one message for all
        raise ModelLoadError(f"cannot load {repo_id!r} from the Hub (no such local folder either): "
                             f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    snapshot = re.search(r"snapshots/([0-9a-f]{40})", config_path)
    cls = model_class(_read_json(Path(config_path)).get("_class_name"))
    model = cls.from_pretrained(repo_id, subfolder=subfolder, revision=revision, torch_dtype=dtype)
    return model, ModelSource(repo_id, snapshot.group(1) if snapshot else revision, subfolder, cls.__name__)


def load_model(source: str, *, subfolder: str | None = None, dtype: torch.dtype | None = None,
               revision: str | None = None) -> tuple[torch.nn.Module, ModelSource]:
    """Load the model that ``source`` names, in eval mode."""
    if source.startswith(BUILTIN_PREFIX):
        try:
            model = load_builtin(source, dtype)
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
        info = ModelSource(source, None, None, type(model).__name__)
    elif Path(source).expanduser().is_dir():
        model, info = _load_local(Path(source).expanduser(), subfolder, dtype, revision)
    elif _looks_like_path(source) or Path(source).expanduser().exists():
        raise ModelLoadError(f"no such model folder: {source}")
    else:
        model, info = _load_hub(source, subfolder, dtype, revision)
    return model.eval(), info
