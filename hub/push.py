"""Upload a CLEAR folder (converted model or CLEAR layers) to the Hub with huggingface_hub.

The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache) and is only ever
handed to huggingface_hub: never printed, logged or written. The folder is validated first and
never modified; the model card uploaded is rendered again from clear_config.json with the repo id, and
clear_config.json goes up without the base model's absolute local path (kept in the folder only as a hint for
finding that base on this machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CLEAR_CONFIG_NAME, LAYERS_FORMAT, read_json
from .clear_layers import read_layers_folder
from .converted import check_converted_folder, read_clear_config
from .download import check_repo_id
from .model_card import render_model_card

LARGE_FOLDER_BYTES = 20 * 1024**3  # above this, the resumable large-folder upload is used
RENDERED = ("README.md", CLEAR_CONFIG_NAME)  # uploaded as rendered for the repo, not as the folder has them


def published_config(meta: dict) -> bytes:
    """clear_config.json as it is uploaded: the same record without the local base model's absolute path (where
    the folder was made: meaningless on the Hub, and not the user's to publish unasked)."""
    meta = dict(meta)
    if isinstance(meta.get("base_model"), dict):
        meta["base_model"] = {k: v for k, v in meta["base_model"].items() if k != "absolute_hint"}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class UploadPlan:
    folder: Path
    files: list[tuple[str, int]]  # (path in repo, size in bytes)
    kind: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [f"{path}  {size:,} bytes" for path, size in self.files]
        return "\n".join(lines + [f"{len(self.files)} files, {self.total_bytes:,} bytes ({self.kind})"])


def validate_folder(folder: str | Path) -> UploadPlan:
    """Complete and consistent, with a model card: otherwise one error saying what is wrong. Checked
    from configs and safetensors headers only, so a 24 GB folder needs no 24 GB of memory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no such folder: {folder}")
    meta = read_clear_config(folder, None)  # raises: not a CLEAR folder / unknown format
    kind = meta["format"]
    if kind == LAYERS_FORMAT:
        read_layers_folder(folder)  # the layers file's header holds exactly the listed tensors
    else:
        check_converted_folder(folder)  # names, shapes, dtypes and sites against the model class
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no model card (README.md)")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    return UploadPlan(folder, files, "CLEAR layers" if kind == LAYERS_FORMAT else "converted model")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, token: str | None = None):
    """Validate ``folder`` and upload it to ``repo_id``; returns the plan (dry run) or the commit info.
    The model card is rendered again for ``repo_id`` (the folder itself is never modified)."""
    check_repo_id("repo_id", repo_id)
    plan = validate_folder(folder)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    meta = read_json(plan.folder / CLEAR_CONFIG_NAME)
    rendered = [CommitOperationAdd("README.md", render_model_card(meta, repo_id, online=True).encode()),
                CommitOperationAdd(CLEAR_CONFIG_NAME, published_config(meta))]
    message = commit_message or f"Upload {plan.kind} with clear-surgery (r = {meta['config']['radius']:g})"
    if plan.total_bytes > LARGE_FOLDER_BYTES:
        # everything but the card and clear_config.json in huggingface_hub's large-upload path (resumable,
        # several commits, where this huggingface_hub has it); then those two, rendered for this repo
        large = getattr(api, "upload_large_folder", None)
        if large is not None:
            large(repo_id=repo_id, folder_path=plan.folder, repo_type="model", revision=revision, private=private,
                  ignore_patterns=[*RENDERED, ".*"])
        else:
            api.upload_folder(repo_id=repo_id, folder_path=plan.folder, revision=revision, commit_message=message,
                              ignore_patterns=[*RENDERED, ".*"])
        return api.create_commit(repo_id, rendered, commit_message=message, revision=revision)
    operations = rendered + [CommitOperationAdd(path, str(plan.folder / path)) for path, _ in plan.files
                             if path not in RENDERED]
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)
