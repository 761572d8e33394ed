"""Checks of command-line arguments that run before any model is read: ranges, choices, output paths,
devices. Light to import (no torch, no diffusers at module level): bad input fails within a second."""

from __future__ import annotations

from pathlib import Path

from clear_surgery.surgery.core.checks import check_number
from clear_surgery.surgery.core.errors import InvalidValueError, MissingHardwareError, OutputExistsError, OutputPathError

# Pillow's formats by extension, for checking an image path before the work that makes the image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_toml(path: str | Path, what: str = "recipe", error=InvalidValueError) -> dict:
    """A TOML file's table; a missing or malformed file is one ``error`` naming it."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}") from None


LAYERS_MODES = ("replace", "delta")  # how CLEAR layers reach a model: in place of its tensors, or added as a change


def check_layers_mode(layers_mode: str, clear_layers) -> None:
    """``--layers-mode``: one of LAYERS_MODES; delta needs layers to take the change from."""
    check(layers_mode in LAYERS_MODES, f"--layers-mode must be replace or delta, got {layers_mode!r}")
    check(layers_mode == "replace" or clear_layers is not None, "--layers-mode delta needs --clear-layers")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidValueError(message)


def in_range(option: str, value, low=None, high=None, *, low_open=True, high_open=False) -> None:
    """``value`` finite and within (low, high] (or as the flags say); None passes (not given)."""
    check_number(option, value, low=low, strict=low_open, high=high, high_strict=high_open, optional=True)


def numbers(option: str, text: str, cast=int, low: float = 0) -> list:
    """A comma-separated list of numbers, each > ``low``."""
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    check(bool(values), f"{option} takes comma-separated numbers, got {text!r}")
    for value in values:
        in_range(option, value, low)
    return values


def output_file(option: str, path: Path | None, suffixes=None, overwrite: bool = False) -> None:
    """One check of an output file, before any work, with the rules of output folders: missing parents are
    created when it is written, an existing file is replaced only with ``overwrite``."""
    from clear_surgery.hub.atomic import writable_parent

    if path is None:
        return
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file {path} already exists (pass --overwrite to replace it)")
    writable_parent(path, option)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{option} {path}: unknown file type {path.suffix or '(none)'!r}; use one of "
                              f"{', '.join(suffixes)}")


def output_folder(option: str, path: Path, overwrite: bool) -> None:
    from clear_surgery.hub.atomic import check_output_folder

    check_output_folder(path, overwrite, option)


def size_in_bytes(option: str, text: str) -> int:
    """'10GB', '500MB', '2GiB' or a plain byte count."""
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise InvalidValueError(f"{option} takes a size such as 10GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def image_format(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def check_device(option: str, device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidValueError(f"{option} {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MissingHardwareError(f"{option} {device}: this machine has no CUDA GPU (torch {torch.__version__}); "
                                   "use --device cpu")


def run_device(option: str, device: str | None) -> str:
    """The device a pipeline runs on: ``device`` (checked), or the GPU when there is one, else the CPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(option, device)
    return device
