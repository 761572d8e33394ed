"""Distillation data: samples the teacher pipeline generated itself, cached to disk as the
transformer's clean latents plus text embeddings (so training needs no text encoder or VAE).

A cache folder holds dataset.json (how the samples were made) and sample-NNNNNN.safetensors,
each written atomically; generation skips samples already there, so it resumes after a crash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clear_surgery.hub import atomic_file, write_json
from clear_surgery.surgery import FAMILIES, family_of

from .recipe import SAMPLE_GLOB, RecipeError

DATASET_FILE = "dataset.json"


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"sample-{index:06d}.safetensors"


def samples_family(model) -> type:
    """The family's adapter between cached samples and transformer inputs."""
    family = family_of(model)
    if family.samples is None:
        supported = sorted(c for f in FAMILIES if f.samples is not None for c in f.class_names)
        raise ValueError(f"distillation supports {supported}, not {type(model).__name__}")
    return family.samples


# --- the cache ------------------------------------------------------------------------------------

def _dataset_identity(recipe) -> dict:
    d = recipe.data
    return {"teacher": recipe.model.teacher, "revision": recipe.model.revision, "dtype": recipe.model.dtype,
            "height": d.height, "width": d.width, "inference_steps": d.inference_steps, "guidance": d.guidance,
            "max_sequence_length": d.max_sequence_length, "seed": d.seed,
            **({"controlnet": recipe.model.controlnet, "control_images": d.control_images, "condition": d.condition,
                "controlnet_scale": d.controlnet_scale} if recipe.model.controlnet else {})}


def _write_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def generate_samples(recipe, *, device=None, progress: bool = True) -> Path:
    """Fill the recipe's data folder with data.num_samples teacher samples (skipping those present)."""
    from tqdm.auto import tqdm

    from ..controlnets import condition_images, controlnet_pipeline, load_controlnet, read_control_images
    from ..pipeline import load_pipeline

    folder, d = recipe.data_folder, recipe.data
    prompts = recipe.prompt_list()
    if not prompts:
        raise RecipeError(f"{recipe.source}: the prompt list is empty")
    identity = _dataset_identity(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / DATASET_FILE
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        if existing.get("generation") != identity:
            raise RecipeError(f"data folder {folder} holds samples made with other settings "
                              f"({existing.get('generation')}); use another data.folder")
    todo = [i for i in range(d.num_samples) if not sample_path(folder, i).exists()]
    if not todo:
        return folder
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    controls = None
    if recipe.model.controlnet:  # the conditions first: a bad image folder fails before any model loads
        controls = condition_images(read_control_images(d.control_images), d.condition)
    pipe = load_pipeline(recipe.teacher_ref(), dtype=recipe.torch_dtype, dense=True)  # the dense teacher
    if controls is not None:
        pipe = controlnet_pipeline(pipe, load_controlnet(recipe.model.controlnet, pipe.transformer, "model.controlnet"))
    pipe.to(device=device, **({"dtype": recipe.torch_dtype} if recipe.torch_dtype else {}))
    pipe.set_progress_bar_config(disable=True)
    family = samples_family(pipe.transformer)
    if not meta_path.exists():
        write_json(meta_path, {"format": "clear-surgery/distill-samples", "family": family.name,
                               "model_class": type(pipe.transformer).__name__, "generation": identity})
    bar = tqdm(total=len(todo), desc="teacher samples", unit="sample", disable=not progress)
    for start in range(0, len(todo), d.generate_batch_size):
        chunk = todo[start:start + d.generate_batch_size]
        texts = [prompts[i % len(prompts)] for i in chunk]
        generators = [torch.Generator(device).manual_seed(d.seed + i) for i in chunk]
        extra = {"controls": [controls[i % len(controls)] for i in chunk]} if controls is not None else {}
        with torch.no_grad():
            samples = family.encode_and_generate(pipe, texts, d, generators, device, **extra)
        for index, text, sample in zip(chunk, texts, samples):
            _write_atomic(sample, sample_path(folder, index), {"prompt": text, "seed": str(d.seed + index)})
        bar.update(len(chunk))
    bar.close()
    del pipe
    return folder


class SampleCache(torch.utils.data.Dataset):
    """The cached samples of a folder, loaded lazily, each a dict of tensors."""

    def __init__(self, folder: str | os.PathLike, indices: list[int] | None = None):
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob(SAMPLE_GLOB))
        if indices is not None:
            self.files = [self.files[i] for i in indices]
        meta = self.folder / DATASET_FILE
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with safe_open(str(self.files[index]), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def split(self, holdout: int) -> tuple["SampleCache", "SampleCache"]:
        """(training samples, the last ``holdout`` samples for evaluation)."""
        n = len(self) - holdout
        return self._subset(range(n)), self._subset(range(n, len(self)))

    def _subset(self, indices) -> "SampleCache":
        subset = SampleCache.__new__(SampleCache)
        subset.folder, subset.meta = self.folder, self.meta
        subset.files = [self.files[i] for i in indices]
        return subset


class RandomSamples(torch.utils.data.Dataset):
    """Random stand-in samples of the right shapes (benchmarks of a model with random weights)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], count: int, fixed: dict | None = None, seed: int = 0):
        self.shapes, self.count, self.fixed, self.seed = shapes, count, fixed or {}, seed

    def __len__(self):
        return self.count

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed + index)
        return {**{k: torch.randn(shape, generator=g) for k, shape in self.shapes.items()}, **self.fixed}


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
