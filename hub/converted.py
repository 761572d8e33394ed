"""Save and load a converted (CLEAR) model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .model_card import write_model_card
from .checkpoint import (CLEAR_CONFIG_NAME, FORMAT, FORMAT_VERSION, atomic_directory, package_version,
                         read_tensor_specs, save_state_dict, tensor_mismatches, weight_files, write_json)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ClearFolderError(ValueError):
    pass


def save_converted(model: torch.nn.Module, out: str | os.PathLike, *, base_model: dict | None = None,
                   overwrite: bool = False, max_shard_size: str | int = "10GB") -> Path:
    """Write ``model`` (with CLEAR attention applied) as a diffusers folder + clear_config.json."""
    config = getattr(model, "_clear_config", None)
    if config is None:
        raise ValueError("model has no CLEAR attention: run apply_clear first")
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        model.save_config(tmp)
        save_state_dict(model.state_dict(), tmp, max_shard_size, desc=f"saving {out.name}")
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "clear_surgery_version": package_version(),
                "config": config.to_dict(), "base_model": base_model or {}, "model_class": type(model).__name__,
                "dtype": dtypes, "sites": list(model._clear_sites), "analysis": model._clear_analysis}
        write_model_card(tmp, meta)
        write_json(tmp / CLEAR_CONFIG_NAME, meta)  # last: a folder with clear_config.json is complete
    return out


def read_clear_config(folder: Path, expected_format: str = FORMAT) -> dict:
    path = folder / CLEAR_CONFIG_NAME
    if not path.is_file():
        raise ClearFolderError(f"{folder} is not a CLEAR folder: no {CLEAR_CONFIG_NAME}")
    data = json.loads(path.read_text())
    if data.get("format") != expected_format or data.get("format_version") != FORMAT_VERSION:
        raise ClearFolderError(f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}, "
                               f"expected {expected_format!r} version {FORMAT_VERSION}")
    return data


def resolve_folder(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id downloaded (or found in the cache; HF_HUB_OFFLINE works)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source).startswith((".", "/", "~")):
        raise ClearFolderError(f"no such folder: {source}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision))
    except Exception as err:
        raise ClearFolderError(f"cannot get {source!r} from the Hub (no such local folder either): "
                               f"{type(err).__name__}: {str(err).splitlines()[0]}") from err


def load_converted(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, verify: bool = False,
                   revision: str | None = None):
    """Load a folder written by ``save_converted`` into a model with its CLEAR attention applied.

    Tensor names and shapes are checked against the model class first; a mismatch is one error
    listing every difference.
    """
    from clear_surgery.surgery.analysis import AnalysisReport
    from clear_surgery.surgery.config import ClearConfig
    from clear_surgery.surgery.loading import model_class
    from clear_surgery.surgery.rewrite import apply_clear

    folder = resolve_folder(folder, revision)
    meta = read_clear_config(folder)
    cls = model_class(json.loads((folder / "config.json").read_text()).get("_class_name"))
    files = weight_files(folder)
    if not files:
        raise ClearFolderError(f"{folder} has no safetensors weights")
    with torch.device("meta"):
        skeleton = cls.from_config(cls.load_config(folder))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    specs = read_tensor_specs(files)
    problems = tensor_mismatches(expected, {k: s for k, (s, _) in specs.items()})
    if problems:
        raise ClearFolderError(f"tensors in {folder} do not match {cls.__name__} built from its config.json:\n  "
                               + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))
    saved_dtypes = {_SAFETENSORS_DTYPES.get(d) for _, d in specs.values()}
    load_dtype = dtype or (saved_dtypes.pop() if len(saved_dtypes) == 1 else None)
    model = cls.from_pretrained(folder, torch_dtype=load_dtype).eval()
    config = ClearConfig.from_dict(meta["config"])
    analysis = AnalysisReport.from_dict(meta["analysis"]) if meta.get("analysis") and not verify else None
    apply_clear(model, config, analysis=analysis, verify=verify)
    if sorted(model._clear_sites) != sorted(meta["sites"]):
        raise ClearFolderError(f"{folder}: clear_config.json lists sites {meta['sites']}, the config selects "
                               f"{model._clear_sites}")
    return model
