"""Atomic writes: a folder or file appears complete or not at all (written beside its final name,
renamed at the end; an error or interrupt removes the partial copy)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from clear_surgery.surgery.core.errors import OutputExistsError, OutputPathError


# The record each command writes into its output folder: a folder holding one of these was written by
# clear-surgery, and --overwrite may replace it (converted model and CLEAR layers, export, profile, bench,
# check-transfer, distill, a distillation checkpoint). Anything else is the user's and is never deleted.
OUTPUT_RECORDS = ("clear_config.json", "manifest.json", "locality.json", "attention.json", "metrics.json",
                  "recipe.json", "state.json")
_PARTIAL, _OLD = "partial", "old"


def check_output_folder(out: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> None:
    """One check of an output folder, before any work: not a file, not the current folder or one holding it,
    replaced only with ``overwrite`` and only if clear-surgery wrote it (or it is empty), and its parent
    writable (created if missing)."""
    out = Path(out)
    where = out.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise OutputPathError(f"{option} {out} is the current folder or holds it: choose a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputPathError(f"{option} {out} is {'a link' if out.is_symlink() else 'a file'}, not a folder")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
        contents = sorted(p.name for p in out.iterdir())
        if contents and not any(name in OUTPUT_RECORDS for name in contents):
            shown = ", ".join(contents[:5]) + (f" and {len(contents) - 5} more" if len(contents) > 5 else "")
            raise OutputExistsError(f"{option} {out} holds files clear-surgery did not write ({shown}): --overwrite "
                                  "replaces only folders it wrote; choose another folder")
    writable_parent(out, option)


def writable_parent(path: str | os.PathLike, option: str = "--out") -> None:
    """The nearest existing folder above ``path`` (missing parents are created when writing) must be writable."""
    where = Path(path).resolve()
    existing = next(p for p in where.parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK) or not _can_make_folder(existing):
        raise OutputPathError(f"{option} {path}: cannot write in {existing}")


def _can_make_folder(parent: Path) -> bool:
    try:
        Path(tempfile.mkdtemp(prefix=".clear-surgery-check-", dir=parent)).rmdir()
        return True
    except OSError:
        return False


def _sibling(out: Path, kind: str) -> Path:
    # the pid in the name lets a later run tell a folder of a killed process from one still being written
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(out: Path) -> None:
    """What a killed writer of ``out`` left beside it: its partial folder is removed; the previous ``out``,
    moved aside just before the new one took its name, comes back if ``out`` is missing (else removed)."""
    for kind in (_OLD, _PARTIAL):
        for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = path.name[len(out.name) + len(kind) + 3:].split("-")[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == _OLD and not out.exists():
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False, option: str = "--out"):
    """Yield a temporary folder beside ``out``; it becomes ``out`` only if the block completes. An existing
    ``out`` is replaced only with ``overwrite`` and only if clear-surgery wrote it (``check_output_folder``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    check_output_folder(out, overwrite, option)
    tmp = _sibling(out, _PARTIAL)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():  # overwrite: move the old folder aside first, so a crash loses neither
            check_output_folder(out, overwrite, option)  # still one of ours after the work
            old = _sibling(out, _OLD)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _default_permissions(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); the result should look like any folder the user makes.
    # Hard-linked files are shared with their source: their mode is left as it is.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if path.is_dir() or path.stat().st_nlink == 1:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
