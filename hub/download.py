"""Files from the Hub (or its local cache: HF_HUB_OFFLINE=1 works as usual), with one error for every
way a download can fail. Nothing here prints or stores a token."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from clear_surgery.surgery.core.errors import ClearSurgeryError, NetworkError


class HubError(ClearSurgeryError, ValueError):
    """A Hub id or file that cannot be resolved."""


class HubUnreachableError(HubError, NetworkError):
    """The Hub cannot be reached and the local cache does not have what is asked."""


def looks_like_path(source: str) -> bool:
    """Typed as a path (./x, /x, ~/x, a/b/c) rather than a Hub id (owner/name)."""
    return source.startswith((".", "/", "~")) or os.sep + os.sep in source or source.count("/") > 1


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


OFFLINE_HINT = "models already in the Hugging Face cache load without a network with HF_HUB_OFFLINE=1"
PROBE_TIMEOUT_S = 4.0
_probes: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not; one probe per process


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def unreachable_reason() -> str | None:
    """Why the Hub endpoint (HF_ENDPOINT, or the proxy in between) cannot be reached, or None.

    huggingface_hub retries a dead network for over a minute; one TCP connection with a deadline
    (name lookup included, hence the thread) tells within seconds."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _probes:
        scheme = urlparse(endpoint).scheme or "https"
        proxy = (os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
                 or os.environ.get("all_proxy") or os.environ.get("ALL_PROXY"))
        target = urlparse(proxy if proxy else endpoint)
        port = target.port or (443 if target.scheme == "https" else 80)
        outcome: list[str | None] = []

        def connect():
            try:
                socket.create_connection((target.hostname, port), timeout=PROBE_TIMEOUT_S).close()
                outcome.append(None)
            except OSError as err:
                outcome.append(f"{type(err).__name__}: {err.strerror or err}")

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(PROBE_TIMEOUT_S + 1)
        via = f" via proxy {target.hostname}:{port}" if proxy else ""
        _probes[endpoint] = outcome[0] if outcome else f"no answer{via} within {PROBE_TIMEOUT_S + 1:g} s"
        if _probes[endpoint] is not None and via:
            _probes[endpoint] += via
    return _probes[endpoint]


def _online_or_cache(call, repo_id: str, **kwargs):
    """``call`` (hf_hub_download / snapshot_download) over the network when the Hub answers, else from
    the local cache only; when neither has it, one error saying what to do."""
    if hub_offline():
        return call(repo_id, **kwargs)
    reason = unreachable_reason()
    if reason is None:
        return call(repo_id, **kwargs)
    from huggingface_hub import constants

    try:
        return call(repo_id, local_files_only=True, **kwargs)
    except Exception as err:
        raise HubUnreachableError(f"cannot load {repo_id!r}: no local folder of that name, and the Hub "
                                  f"({constants.ENDPOINT}) cannot be reached ({reason}); {OFFLINE_HINT}") from err


def hub_file(repo_id: str, filename: str, revision: str | None = None, *, required: bool = True) -> Path | None:
    """One file of a Hub repo; None when ``required`` is False and the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(_online_or_cache(hf_hub_download, repo_id, filename=filename, revision=revision))
    except (LocalEntryNotFoundError, HubUnreachableError) as err:
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


def require_reachable(source: str, *, file: bool = False, upload: bool = False) -> None:
    """Fail within seconds when ``source`` needs the Hub and the Hub cannot be reached, unless the local
    cache has it. ``source``: a model argument (OWNER/NAME), with ``file`` a file argument
    (OWNER/REPO/FILENAME), with ``upload`` a repo to push to."""
    path = Path(source).expanduser()
    local = (source.startswith((".", "/", "~")) or source.count("/") < 2) if file else looks_like_path(source)
    if not upload and (":" in source or path.exists() or local):
        return  # builtin:, a local path, or a path typed as one: the resolver says what is wrong with it
    if hub_offline() and not upload:
        return
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else unreachable_reason()
    repo_id = "/".join(source.split("/")[:2])
    if reason is None or (not upload and _cached(repo_id, None)):
        return
    from huggingface_hub import constants

    if upload:
        raise HubUnreachableError(f"cannot upload to {repo_id!r}: the Hub ({constants.ENDPOINT}) cannot be reached "
                                  f"({reason}); --dry-run checks the folder without a network")
    raise HubUnreachableError(f"cannot load {source!r}: no local folder of that name, and the Hub "
                              f"({constants.ENDPOINT}) cannot be reached ({reason}); {OFFLINE_HINT}")


def check_repo_id(option: str, repo_id: str) -> None:
    """OWNER/NAME as the Hub accepts it (checked before any work, dry runs included)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must be OWNER/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"{option} {repo_id!r} is not a valid Hub repo id: {str(err).splitlines()[0]}") from None


def _unreachable(repo_id: str, err: Exception) -> HubError:
    if isinstance(err, HubError):
        return err
    why = ("HF_HUB_OFFLINE is set and the Hugging Face cache does not have it" if hub_offline()
           else _first_line(err))
    return HubError(f"cannot load {repo_id!r} from the Hub (no such local folder either): {why}")


def _cached(repo_id: str, revision: str | None) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (a file lookup, no request)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return (repo / "refs" / (revision or "main")).is_file() or bool(revision and (repo / "snapshots" / revision).is_dir())


def hub_snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local snapshot of a Hub repo (only the files ``allow_patterns`` select)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(_online_or_cache(snapshot_download, repo_id, revision=revision,
                                     allow_patterns=allow_patterns))
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
