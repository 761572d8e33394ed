"""Converted-model folders: a stock diffusers model folder plus clear_config.json.

Stock diffusers loads the folder as the dense model; ``load_converted`` loads it with its CLEAR
attention. Folders are written atomically: into a hidden sibling, renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

CLEAR_CONFIG_NAME = "clear_config.json"
FORMAT = "clear-surgery/converted-model"
FORMAT_VERSION = 1
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def package_version() -> str:
    try:
        return version("clear-surgery")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; it becomes ``out`` only if the block completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():  # overwrite: move the old folder aside first, so a crash loses neither
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); the result should look like any folder the user makes.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: str | int = "10GB",
                    desc: str = "saving") -> list[str]:
    """Safetensors shards + index under diffusers' names, with a progress bar."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    files = list(split.filename_to_tensors.items())
    for filename, names in tqdm(files, desc=desc, unit="file", disable=len(files) < 2):
        shard = {n: state_dict[n].detach().contiguous().cpu() for n in names}
        save_file(shard, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        write_json(folder / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return [f for f, _ in files]


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / WEIGHTS_PATTERN.format(suffix="")
    return [single] if single.is_file() else []


def read_tensor_specs(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from safetensors headers, without reading the tensors."""
    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return specs


def tensor_mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Readable list of missing, unexpected and mis-shaped tensors (empty when they match)."""
    problems = [f"missing: {n} {list(expected[n])}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected: {n} {list(found[n])}" for n in sorted(set(found) - set(expected))]
    problems += [f"shape of {n}: expected {list(expected[n])}, found {list(found[n])}"
                 for n in sorted(set(expected) & set(found)) if tuple(expected[n]) != tuple(found[n])]
    return problems
