"""Training checkpoints: trained tensors, optimizer and schedule, RNG states and the data position,
written atomically (a folder renamed into place), so a run killed at any moment resumes exactly."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clear_surgery.hub import atomic_directory, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    samples_seen: int  # global position in the sample stream (epochs = samples_seen // train set size)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are hidden folders and never listed)."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()), key=_step_of)


def save_checkpoint(out: Path, state: TrainingState, trained: dict[str, torch.Tensor], optimizer, scheduler,
                    rng: dict, fingerprint: dict, keep: int) -> Path:
    path = out / CHECKPOINTS / f"step-{state.step:08d}"
    with atomic_directory(path, overwrite=True) as tmp:
        save_file({n: t.detach().contiguous().cpu() for n, t in trained.items()}, tmp / "trained.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / STATE_FILE, {"step": state.step, "samples_seen": state.samples_seen,
                                      "fingerprint": fingerprint})
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, fingerprint: dict):
    """(state, trained tensors, optimizer+scheduler states, rng) of a checkpoint written by the same recipe."""
    meta = json.loads((path / STATE_FILE).read_text())
    saved = meta["fingerprint"]
    if saved != fingerprint:
        changed = sorted(f"{table}.{key}" for table in set(saved) | set(fingerprint)
                         for key in set(saved.get(table, {})) | set(fingerprint.get(table, {}))
                         if saved.get(table, {}).get(key) != fingerprint.get(table, {}).get(key))
        raise ValueError(f"checkpoint {path} was written by a different recipe (changed: {changed}); "
                         "resume with the same recipe or use another output.dir")
    trained = load_file(str(path / "trained.safetensors"))
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=True)
    return TrainingState(meta["step"], meta["samples_seen"]), trained, optim, rng


def rng_state() -> dict:
    """Global torch (and CUDA) generator states, for anything random besides the training noise."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
