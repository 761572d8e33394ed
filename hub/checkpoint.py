"""Pieces shared by clear-surgery's folder formats: names, weight files under diffusers' names, tensor
specs from safetensors headers, and the check of those specs against a model class."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clear_surgery.surgery.core.errors import FileFormatError

from .atomic import write_json
from .safetensors_io import DTYPES, Header, SafetensorsError, read_header, write_file

CLEAR_CONFIG_NAME = "clear_config.json"
FORMAT = "clear-surgery/converted-model"
LAYERS_FORMAT = "clear-surgery/clear-layers"
FORMAT_VERSION = 1
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class ClearFolderError(FileFormatError):
    pass


def package_version() -> str:
    try:
        return version("clear-surgery")
    except PackageNotFoundError:
        return "unknown"


def read_json(path: Path) -> dict:
    """A JSON file; one error naming the file when it is missing or damaged."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ClearFolderError(f"cannot read {path}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ClearFolderError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ClearFolderError(f"{path}: expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder (sharded with an index, or one file)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ClearFolderError(f"{index}: no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / WEIGHTS_PATTERN.format(suffix="")
    return [single] if single.is_file() else []


def read_headers(files: list[Path]) -> list[Header]:
    headers = [read_header(path) for path in files]
    seen: dict[str, Path] = {}
    for header in headers:
        for name in header.tensors:
            if name in seen:
                raise SafetensorsError(f"tensor {name!r} is stored twice: in {seen[name]} and {header.path}")
            seen[name] = header.path
    return headers


def read_tensor_specs(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype code) from the headers, without reading any tensor."""
    return {e.name: (e.shape, e.dtype) for h in read_headers(files) for e in h.tensors.values()}


def stored_dtype(specs: dict[str, tuple[tuple[int, ...], str]]) -> torch.dtype | None:
    """The one floating dtype the weights are stored in (None: no floating tensor, or several)."""
    found = {DTYPES[code] for _, code in specs.values() if DTYPES[code].is_floating_point}
    return found.pop() if len(found) == 1 else None


def tensor_mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Readable list of missing, unexpected and mis-shaped tensors (empty when they match)."""
    problems = [f"missing: {n} {list(expected[n])}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected: {n} {list(found[n])}" for n in sorted(set(found) - set(expected))]
    problems += [f"shape of {n}: expected {list(expected[n])}, found {list(found[n])}"
                 for n in sorted(set(expected) & set(found)) if tuple(expected[n]) != tuple(found[n])]
    return problems


def listed(problems: list[str], limit: int = 20) -> str:
    more = f"\n  ... {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  ".join(problems[:limit]) + more


def skeleton(cls, config: dict):
    """The model class built from its config on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return cls.from_config(config)


def check_specs(model, specs: dict, where) -> None:
    """Tensor names and shapes of a folder against ``model`` (its class built from the folder's config,
    on the meta device); floating dtypes must be one of those torch loads. One error lists every
    difference."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = tensor_mismatches(expected, {k: s for k, (s, _) in specs.items()})
    dtypes = sorted({code for _, code in specs.values() if DTYPES[code].is_floating_point})
    if len(dtypes) > 1:
        problems.append(f"weights mix floating dtypes {dtypes}")
    if problems:
        raise ClearFolderError(f"tensors in {where} do not match {type(model).__name__} built from its config.json:\n  "
                               + listed(problems))


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "10GB",
                    desc: str = "saving") -> list[str]:
    """Safetensors shards + index under diffusers' names, with a progress bar (a model in memory)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    files = list(split.filename_to_tensors.items())
    for filename, names in tqdm(files, desc=desc, unit="file", disable=len(files) < 2):
        write_file(folder / filename, [(n, state_dict[n].dtype, tuple(state_dict[n].shape)) for n in names],
                   lambda n: state_dict[n], metadata={"format": "pt"})
    if split.is_sharded:
        write_json(folder / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return [f for f, _ in files]


def portable_record(record: dict, folder: str | os.PathLike) -> dict:
    """A base-model record as a CLEAR folder saves it: a local base as a path relative to ``folder`` (so the
    two can move together), its absolute path kept only as a hint; Hub ids and built-ins as they are."""
    identity = record.get("id")
    if not identity or not Path(identity).is_absolute():
        return dict(record)
    relative = os.path.relpath(identity, Path(folder).resolve())
    return {**record, "id": relative, "relative_to": "folder", "absolute_hint": identity}
