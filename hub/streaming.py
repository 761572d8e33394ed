"""Weights copied from folder to folder without holding a model: unchanged shards are hard-linked
(or copied in a stream where links cannot be made), changed shards are rewritten one tensor at a
time, so memory stays near the largest tensor whatever the model's size."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from .safetensors_io import Header, read_tensor, write_file

# errors that mean "no hard link here" (another filesystem, no permission, unsupported, too many links)
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EMLINK, getattr(errno, "EOPNOTSUPP", -1)}


def link_or_copy(source: Path, target: Path, link: bool = True) -> str:
    """``target`` holds ``source``'s bytes: a hard link where the filesystem allows and ``link`` is on
    ("link"), else a streamed copy ("copy"). Links of a Hub cache file point at its blob, not at the
    cache's symlink."""
    real = Path(source).resolve()
    if link:
        try:
            os.link(real, target)
            return "link"
        except OSError as err:
            if err.errno not in _NO_LINK:
                raise
    shutil.copyfile(real, target)  # streamed in chunks (sendfile where available)
    return "copy"


def write_tensors(target: Path, names, source_of: dict[str, Header], *, dtype: torch.dtype | None = None,
                  replace: dict[str, Callable[[], torch.Tensor]] | None = None, metadata: dict | None = None,
                  extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the tensors ``names`` (each read from its header in ``source_of``) to ``target`` one at a
    time, in the stored dtype or, for floating tensors, ``dtype``; those named in ``replace`` come from
    there instead, cast the same way; ``extra``: small tensors held in memory, written after them."""
    replace = replace or {}
    extra = extra or {}

    def out_dtype(name):
        stored = source_of[name].tensors[name].torch_dtype
        return dtype if dtype is not None and stored.is_floating_point else stored

    def produce(name):
        if name in extra:
            return extra[name].to(dtype or extra[name].dtype)
        tensor = replace[name]() if name in replace else read_tensor(source_of[name], name)
        return tensor.to(out_dtype(name))

    specs = [(n, out_dtype(n), source_of[n].tensors[n].shape) for n in names]
    specs += [(n, dtype or t.dtype, tuple(t.shape)) for n, t in extra.items()]
    write_file(target, specs, produce, metadata)


def rewrite_shard(header: Header, target: Path, *, dtype: torch.dtype | None = None,
                  replace: dict[str, Callable[[], torch.Tensor]] | None = None) -> None:
    """Write ``header``'s tensors to ``target`` in the same order (see ``write_tensors``)."""
    write_tensors(target, list(header.tensors), dict.fromkeys(header.tensors, header), dtype=dtype, replace=replace,
                  metadata=header.metadata)


def changes_shard(header: Header, dtype: torch.dtype | None, replaced: set[str]) -> bool:
    """Whether writing this shard with ``dtype`` and ``replaced`` tensors changes any byte."""
    if replaced & set(header.tensors):
        return True
    return dtype is not None and any(e.torch_dtype.is_floating_point and e.torch_dtype != dtype
                                     for e in header.tensors.values())
