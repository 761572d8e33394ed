"""Files from the Hub (or its local cache: HF_HUB_OFFLINE=1 works as usual), with one error for every
way a download can fail. Nothing here prints or stores a token."""

from __future__ import annotations

import os
from pathlib import Path


class HubError(ValueError):
    pass


def looks_like_path(source: str) -> bool:
    """Typed as a path (./x, /x, ~/x, a/b/c) rather than a Hub id (owner/name)."""
    return source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def hub_file(repo_id: str, filename: str, revision: str | None = None, *, required: bool = True) -> Path | None:
    """One file of a Hub repo; None when ``required`` is False and the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as err:
        # offline: a file missing from a cached snapshot is absent; without a snapshot nobody can tell
        if not required and _cached(repo_id, revision):
            return None
        raise _unreachable(repo_id, err) from err
    except EntryNotFoundError:
        if not required:
            return None
        raise HubError(f"{repo_id} has no file {filename}") from None
    except HFValidationError as err:
        raise HubError(f"{repo_id!r} is not a local folder, a builtin: model or a valid Hub id: {err}") from err
    except Exception as err:  # not found, gated, offline, no network: one message for all
        raise _unreachable(repo_id, err) from err


def _unreachable(repo_id: str, err: Exception) -> HubError:
    return HubError(f"cannot load {repo_id!r} from the Hub (no such local folder either): {_first_line(err)}")


def _cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
        return True
    except Exception:
        return False


def hub_snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of a Hub repo (only the files ``allow_patterns`` select)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as err:
        raise _unreachable(repo_id, err) from err


def resolve_folder(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id downloaded (or found in the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(str(source)) or path.exists():
        raise HubError(f"no such folder: {source}")
    return hub_snapshot(str(source), revision)


def resolve_file(source: str, revision: str | None = None) -> Path:
    """A local file, or OWNER/REPO/FILENAME on the Hub (downloaded to the huggingface_hub cache)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    parts = source.split("/")
    if len(parts) < 3 or source.startswith((".", "/", "~")):
        raise HubError(f"no such file: {source} (a Hub file is written OWNER/REPO/FILENAME)")
    return hub_file("/".join(parts[:2]), "/".join(parts[2:]), revision)
