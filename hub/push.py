"""Upload a CLEAR folder (converted model or CLEAR layers) to the Hub with huggingface_hub.

The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache) and is only ever
handed to huggingface_hub: never printed, logged or written. The folder is validated first and
never modified; the model card uploaded is rendered again from clear_config.json with the repo id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CLEAR_CONFIG_NAME
from .model_card import render_model_card

LARGE_FOLDER_BYTES = 20 * 1024**3  # above this, the resumable large-folder upload is used


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
    """Complete, loadable, with a model card: otherwise one error saying what is wrong."""
    from .clear_layers import LAYERS_FILE, LAYERS_FORMAT, layer_shapes, read_layers_folder
    from .converted import FORMAT, read_clear_config, weight_files

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no such folder: {folder}")
    meta = json.loads((folder / CLEAR_CONFIG_NAME).read_text()) if (folder / CLEAR_CONFIG_NAME).is_file() else {}
    kind = meta.get("format")
    if kind == LAYERS_FORMAT:
        meta = read_layers_folder(folder)  # raises when the layers file is missing
        if set(layer_shapes(folder / LAYERS_FILE)) != set(meta["tensors"]):
            raise ValueError(f"{folder / LAYERS_FILE} does not hold the tensors clear_config.json lists")
    elif kind == FORMAT:
        from .converted import load_converted

        load_converted(folder)  # names, shapes and sites checked; raises with the reason
        if not weight_files(folder):
            raise ValueError(f"{folder} is incomplete: no weights")
    else:
        read_clear_config(folder)  # raises: not a CLEAR folder / unknown format
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no model card (README.md)")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    return UploadPlan(folder, files, "CLEAR layers" if kind == LAYERS_FORMAT else "converted model")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, token: str | None = None):
    """Validate ``folder`` and upload it to ``repo_id``; returns the plan (dry run) or the commit info."""
    plan = validate_folder(folder)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    meta = json.loads((plan.folder / CLEAR_CONFIG_NAME).read_text())
    card = render_model_card(meta).replace("REPO_ID", repo_id).encode()
    message = commit_message or f"Upload {plan.kind} with clear-surgery (r = {meta['config']['radius']:g})"
    if plan.total_bytes > LARGE_FOLDER_BYTES:
        # resumable, multi-commit; the card is uploaded with the folder as it is
        api.upload_large_folder(repo_id=repo_id, folder_path=plan.folder, repo_type="model", revision=revision,
                                private=private)
        return None
    operations = [CommitOperationAdd(path, card if path == "README.md" else str(plan.folder / path))
                  for path, _ in plan.files]
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)
