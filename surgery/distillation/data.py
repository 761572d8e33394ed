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

DATASET_FILE = "dataset.json"


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"sample-{index:06d}.safetensors"


def count_samples(folder: Path) -> int:
    return len(list(Path(folder).glob("sample-*.safetensors")))


# --- model families: how a cached sample becomes transformer inputs --------------------------------

class FluxSamples:
    """FLUX.1: packed latents (tokens, 64), T5 embeddings, pooled CLIP, position ids; timestep = sigma."""

    name = "flux"

    @staticmethod
    def encode_and_generate(pipe, prompts, s, generators, device) -> list[dict]:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      max_sequence_length=_max_len(pipe, s))
        kwargs = dict(guidance_scale=s.guidance) if s.guidance is not None else {}
        latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=s.height, width=s.width,
                       num_inference_steps=s.inference_steps, generator=generators, output_type="latent",
                       **kwargs).images
        grid = 2 * (s.height // (pipe.vae_scale_factor * 2)), 2 * (s.width // (pipe.vae_scale_factor * 2))
        img_ids = pipe._prepare_latent_image_ids(1, grid[0] // 2, grid[1] // 2, device, latents.dtype)
        return [dict(latents=latents[i], prompt_embeds=embeds[i], pooled_prompt_embeds=pooled[i],
                     txt_ids=text_ids, img_ids=img_ids) for i in range(len(prompts))]

    @staticmethod
    def model_inputs(model, batch: dict, noisy: torch.Tensor, sigma: torch.Tensor, guidance: float | None) -> dict:
        inputs = dict(hidden_states=noisy, encoder_hidden_states=batch["prompt_embeds"],
                      pooled_projections=batch["pooled_prompt_embeds"], timestep=sigma,
                      img_ids=batch["img_ids"][0], txt_ids=batch["txt_ids"][0], return_dict=False)
        if getattr(model.config, "guidance_embeds", False):
            inputs["guidance"] = torch.full_like(sigma, 3.5 if guidance is None else guidance)
        return inputs


class SD3Samples:
    """SD3 / SD3.5: latents (channels, h, w), joint embeddings, pooled; timestep = 1000 sigma."""

    name = "sd3"

    @staticmethod
    def encode_and_generate(pipe, prompts, s, generators, device) -> list[dict]:
        cfg = s.guidance is not None and s.guidance > 1
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            max_sequence_length=_max_len(pipe, s))
        kwargs = dict(guidance_scale=s.guidance) if s.guidance is not None else {}
        latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                       negative_pooled_prompt_embeds=negative_pooled, height=s.height, width=s.width,
                       num_inference_steps=s.inference_steps, generator=generators, output_type="latent",
                       **kwargs).images
        return [dict(latents=latents[i], prompt_embeds=embeds[i], pooled_prompt_embeds=pooled[i])
                for i in range(len(prompts))]

    @staticmethod
    def model_inputs(model, batch: dict, noisy: torch.Tensor, sigma: torch.Tensor, guidance: float | None) -> dict:
        return dict(hidden_states=noisy, encoder_hidden_states=batch["prompt_embeds"],
                    pooled_projections=batch["pooled_prompt_embeds"], timestep=sigma * 1000, return_dict=False)


SAMPLE_FAMILIES = {"FluxTransformer2DModel": FluxSamples, "SD3Transformer2DModel": SD3Samples}


def samples_family(model_or_class_name) -> type:
    name = model_or_class_name if isinstance(model_or_class_name, str) else type(model_or_class_name).__name__
    if name not in SAMPLE_FAMILIES:
        raise ValueError(f"distillation supports {sorted(SAMPLE_FAMILIES)}, not {name}")
    return SAMPLE_FAMILIES[name]


def _max_len(pipe, s) -> int:
    tokenizer = getattr(pipe, "tokenizer_2", None) if "Flux" in type(pipe).__name__ else getattr(pipe, "tokenizer_3",
                                                                                                   None)
    return min(s.max_sequence_length, tokenizer.model_max_length) if tokenizer is not None else s.max_sequence_length


# --- the cache ------------------------------------------------------------------------------------

def _dataset_identity(recipe) -> dict:
    d = recipe.data
    return {"teacher": recipe.model.teacher, "revision": recipe.model.revision, "dtype": recipe.model.dtype,
            "height": d.height, "width": d.width, "inference_steps": d.inference_steps, "guidance": d.guidance,
            "max_sequence_length": d.max_sequence_length, "seed": d.seed}


def _write_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def generate_samples(recipe, *, device=None, progress: bool = True) -> Path:
    """Fill the recipe's data folder with data.num_samples teacher samples (skipping those present)."""
    from tqdm.auto import tqdm

    from clear_surgery.surgery.generate import load_pipeline

    from .recipe import RecipeError

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
    dtype = getattr(torch, recipe.model.dtype)
    pipe = load_pipeline(recipe.model.teacher, dtype=dtype)  # the dense teacher
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    family = samples_family(pipe.transformer)
    if not meta_path.exists():
        meta_path.write_text(json.dumps({"format": "clear-surgery/distill-samples", "family": family.name,
                                         "model_class": type(pipe.transformer).__name__,
                                         "generation": identity}, indent=2) + "\n")
    bar = tqdm(total=len(todo), desc="teacher samples", unit="sample", disable=not progress)
    for start in range(0, len(todo), d.generate_batch_size):
        chunk = todo[start:start + d.generate_batch_size]
        texts = [prompts[i % len(prompts)] for i in chunk]
        generators = [torch.Generator(device).manual_seed(d.seed + i) for i in chunk]
        with torch.no_grad():
            samples = family.encode_and_generate(pipe, texts, d, generators, device)
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
        self.files = sorted(self.folder.glob("sample-*.safetensors"))
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
