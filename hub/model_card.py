"""Model cards (README.md with YAML front matter) generated from a checkpoint's own clear_config.json."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("clear_surgery")

PIPELINES = {"FluxTransformer2DModel": "FluxPipeline", "SD3Transformer2DModel": "StableDiffusion3Pipeline",
             "FluxControlNetModel": "FluxControlNetPipeline", "SD3ControlNetModel": "StableDiffusion3ControlNetPipeline"}


def base_model_license(base_id: str | None) -> str | None:
    """The base model's license from its own card, when it can be read (Hub or cache)."""
    if not base_id or base_id.startswith("builtin:") or Path(base_id).exists():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(base_id).data.license
    except Exception as err:  # offline, gated, no card: the card just carries no license
        logger.info("no license for %s: %s", base_id, type(err).__name__)
        return None


def _usage(meta: dict, is_layers: bool) -> str:
    base = meta["base_model"].get("id") or "BASE_MODEL"
    cls = meta["model_class"]
    sub = meta["base_model"].get("subfolder")
    sub_arg = f', subfolder="{sub}"' if sub else ""
    pipeline = PIPELINES.get(cls, "DiffusionPipeline")
    if is_layers:
        load = (f'model = {cls}.from_pretrained("{base}"{sub_arg}, torch_dtype=torch.bfloat16)\n'
                f'load_clear_layers(model, "REPO_ID")  # or a local folder\n')
        imports = "from clear_surgery.hub import load_clear_layers"
    else:
        load = 'model = load_converted("REPO_ID")  # or a local folder\n'
        imports = "from clear_surgery.hub import load_converted"
    target = "controlnet" if "ControlNet" in cls else "transformer"
    return (f"```python\nimport torch\nfrom diffusers import {cls}, {pipeline}\n{imports}\n\n{load}"
            f'pipe = {pipeline}.from_pretrained("{base}", {target}=model, torch_dtype=torch.bfloat16)\n```\n')


def render_model_card(meta: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    is_layers = meta["format"].endswith("clear-layers")
    config = meta["config"]
    base = meta["base_model"].get("id")
    data = ModelCardData(
        base_model=base if base and not base.startswith("builtin:") else None,
        base_model_relation="adapter" if is_layers else "finetune",
        library_name="diffusers", pipeline_tag="text-to-image", license=base_model_license(base),
        tags=["clear", "linear-attention", "local-attention", "clear-surgery", meta["model_class"]],
    )
    what = "CLEAR layers (the tensors CLEAR changes)" if is_layers else "a linearized transformer"
    sites = meta.get("sites", [])
    lines = [
        f"# {meta['model_class']} with CLEAR attention (r = {config['radius']:g})", "",
        f"This repository holds {what} made with clear-surgery from `{base or 'an unnamed base model'}`"
        f"{' at revision ' + meta['base_model']['revision'] if meta['base_model'].get('revision') else ''}.",
        "CLEAR (arXiv 2412.16112) replaces joint text-image attention by a local one: text queries attend to",
        "every token; each image query attends to all text tokens and the image tokens within radius r on the",
        "token grid, so attention cost grows linearly with resolution.", "",
        "## What was done", "",
        f"- radius: {config['radius']:g} tokens (strict: distance < r), token layout: {config['token_layout']}",
        *(["- per-layer radii: " + ", ".join(f"`{k}`: {v:g}" for k, v in config["radius_overrides"].items())]
          if config.get("radius_overrides") else []),
        f"- converted attention modules: {len(sites)} ({', '.join(sites[:3])}{', ...' if len(sites) > 3 else ''})",
    ]
    if is_layers:
        lines.append(f"- tensors stored: {len(meta['tensors'])}, selected by {meta['trained']}")
    lines.append(f"- training: {meta.get('training') or 'none (zero-shot conversion)'}")
    metrics = meta.get("metrics") or {}
    lines.append("- metrics: " + (", ".join(f"{k} = {v}" for k, v in metrics.items()) if metrics else "none measured"))
    lines += ["", "## Usage", "", _usage(meta, is_layers),
              f"Made with clear-surgery {meta.get('clear_surgery_version', '')}; settings in `clear_config.json`."]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def write_model_card(folder: Path, meta: dict) -> None:
    (Path(folder) / "README.md").write_text(render_model_card(meta))
