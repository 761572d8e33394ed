"""Safetensors files read and written one tensor at a time.

The header is parsed and checked here (a truncated or damaged file fails with one message naming
it, before any tensor is read), single tensors are read by offset, and files are written from a
list of (name, dtype, shape) with each tensor produced only when its turn comes, so a 10 GB shard
never needs 10 GB of memory. The files are ordinary safetensors files (8-byte little-endian header
length, a JSON header padded to 8 bytes, the tensors' bytes back to back).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from clear_surgery.surgery.core.errors import FileFormatError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # as the safetensors library


class SafetensorsError(FileFormatError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """The header of a safetensors file, checked against the file's size; one error names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > min(MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: not a complete safetensors file ({size} bytes; header length "
                                       f"{length if length >= 0 else 'missing'}): truncated or damaged")
            raw = json.loads(f.read(length))
    except OSError as err:
        raise SafetensorsError(f"cannot read {path}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SafetensorsError(f"{path}: damaged safetensors header ({err})") from err
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    base = 8 + length
    entries = []
    for name, info in raw.items():
        try:
            code, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            itemsize = torch.empty(0, dtype=DTYPES[code]).element_size()
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: damaged header entry for {name!r} ({type(err).__name__}: {err})") from err
        if end - start != math.prod(shape) * itemsize or start < 0:
            raise SafetensorsError(f"{path}: header entry {name!r} does not match its shape {list(shape)} "
                                   f"and dtype {code}")
        entries.append(TensorEntry(name, code, shape, base + start, base + end))
    entries.sort(key=lambda e: e.start)
    position = base
    for entry in entries:
        if entry.start != position:
            raise SafetensorsError(f"{path}: damaged header (tensor {entry.name!r} does not follow the previous one)")
        position = entry.end
    if position != size:
        raise SafetensorsError(f"{path}: the header describes {position} bytes but the file has {size}: "
                               f"{'truncated' if size < position else 'damaged'}")
    return Header(path, {e.name: e for e in entries}, dict(metadata))


def read_tensor(header: Header, name: str) -> torch.Tensor:
    """One tensor, read from disk into memory of its own size."""
    entry = header.tensors[name]
    buffer = bytearray(entry.nbytes)
    with open(header.path, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buffer) != entry.nbytes:
            raise SafetensorsError(f"{header.path}: truncated while reading {name!r}")
    if not buffer:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(entry.torch_dtype).reshape(entry.shape)


def write_file(path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
               produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are ``specs`` (name, dtype, shape), in that order;
    ``produce(name)`` is called once per tensor, when it is written."""
    specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise SafetensorsError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, "
                                       f"expected {dtype} {list(shape)}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
