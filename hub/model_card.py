"""Model cards (README.md with YAML front matter) generated from a checkpoint's own clear_config.json."""

from __future__ import annotations

import logging
from pathlib import Path

from clear_surgery.surgery import BUILTIN_PREFIX, family_for_class, is_controlnet

logger = logging.getLogger("clear_surgery")
REPO_PLACEHOLDER = "REPO_ID"  # replaced by the repo id when the card is rendered for an upload


def distillation_made_worse(metrics: dict) -> bool:
    """Whether a distillation ended further from its teacher on the held-out samples than zero-shot CLEAR."""
    before, after = metrics.get("zero_shot_student_teacher_mse"), metrics.get("eval_student_teacher_mse")
    return isinstance(before, float) and isinstance(after, float) and after > before


def base_model_license(base_id: str | None, *, online: bool = False) -> str | None:
    """The base model's license from its own card, when it can be read: from the local Hugging Face
    cache, or with ``online`` (an upload, which needs the network anyway) from the Hub. A local save
    never touches the network."""
    if not base_id or base_id.startswith(BUILTIN_PREFIX) or Path(base_id).exists():
        return None
    try:
        from huggingface_hub import ModelCard, try_to_load_from_cache

        from .download import unreachable_reason

        if online and unreachable_reason() is None:
            return ModelCard.load(base_id).data.license
        cached = try_to_load_from_cache(base_id, "README.md")  # a file lookup: no request of any kind
        return ModelCard.load(cached).data.license if isinstance(cached, str) else None
    except Exception as err:  # not cached, offline, gated, no card: the card just carries no license
        logger.info("no license for %s: %s", base_id, type(err).__name__)
        return None


def _usage(meta: dict, is_layers: bool, repo_id: str) -> str:
    base = meta["base_model"].get("id") or "BASE_MODEL"
    cls = meta["model_class"]
    if base.startswith(BUILTIN_PREFIX):  # no Hub base: the resolver builds it
        return ("```python\nfrom clear_surgery.hub import load_model\n\n"
                f'model, _ = load_model("{repo_id}")  # {base} with CLEAR attention\n```\n')
    sub = meta["base_model"].get("subfolder")
    sub_arg = f', subfolder="{sub}"' if sub else ""
    family = family_for_class(cls)
    pipeline = (family.pipeline_for(cls) if family else None) or "DiffusionPipeline"
    if is_layers:
        load = (f'model = {cls}.from_pretrained("{base}"{sub_arg}, torch_dtype=torch.bfloat16)\n'
                f'load_clear_layers(model, "{repo_id}")  # or a local folder\n')
        imports = "from clear_surgery.hub import load_clear_layers"
    else:
        load = f'model = load_converted("{repo_id}")  # or a local folder\n'
        imports = "from clear_surgery.hub import load_converted"
    target = "controlnet" if is_controlnet(cls) else "transformer"
    return (f"```python\nimport torch\nfrom diffusers import {cls}, {pipeline}\n{imports}\n\n{load}"
            f'pipe = {pipeline}.from_pretrained("{base}", {target}=model, torch_dtype=torch.bfloat16)\n```\n')


def _patterns_used(meta: dict, sites: list[str]) -> list[str]:
    """The layers' selection patterns that selected a stored tensor (a plain-CLEAR folder's card does not list
    the pooled-key variant's spatial_weight pattern)."""
    import fnmatch

    stored = list(meta.get("tensors", {}))
    return [p for p in meta.get("trained", []) if any(fnmatch.fnmatchcase(name, p.format(site=site) if "{site}" in p
                                                                            else p) for name in stored for site in sites)]


def describe_training(training: dict | None) -> list[str]:
    """The card's lines on how the CLEAR tensors were made (zero-shot when there is no record)."""
    if not training:
        return ["- training: none (zero-shot conversion: the dense model's weights, CLEAR attention)"]
    if training.get("method") == "distillation":
        lines = [f"- training: distilled against the dense teacher `{training.get('teacher')}` for "
                 f"{training.get('steps')} steps (recipe `{training.get('recipe')}`, sha256 "
                 f"`{str(training.get('recipe_sha256'))[:16]}...`; the recipe is in clear_config.json)"]
        metrics = training.get("metrics") or {}
        if metrics:
            lines.append("- held-out metrics: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                             for k, v in metrics.items()))
        if distillation_made_worse(metrics):
            lines.append("- **warning**: these layers are further from the dense teacher on the held-out samples than "
                         "zero-shot CLEAR (the distillation made the student worse)")
        return lines
    if training.get("method") == "imported CLEAR layers":
        return [f"- training: CLEAR layers imported from `{training.get('file')}` (sha256 "
                f"`{str(training.get('sha256'))[:16]}...`)"]
    return ["- training: " + ", ".join(f"{k} = {v}" for k, v in training.items())]


def render_model_card(meta: dict, repo_id: str = REPO_PLACEHOLDER, *, online: bool = False) -> str:
    """README.md of a CLEAR folder; ``online``: the base model's license may be read from the Hub."""
    from huggingface_hub import ModelCard, ModelCardData

    is_layers = meta["format"].endswith("clear-layers")
    config = meta["config"]
    base = meta["base_model"].get("id")
    data = ModelCardData(
        base_model=base if base and not base.startswith(BUILTIN_PREFIX) else None,
        base_model_relation="adapter" if is_layers else "finetune",
        library_name="diffusers", pipeline_tag="text-to-image", license=base_model_license(base, online=online),
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
        lines.append(f"- tensors stored: {len(meta['tensors'])}, selected by {_patterns_used(meta, sites)}")
    lines += describe_training(meta.get("training"))
    lines += ["", "## Usage", "", _usage(meta, is_layers, repo_id),
              f"Made with clear-surgery {meta.get('clear_surgery_version', '')}; settings in `clear_config.json`."]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def write_model_card(folder: Path, meta: dict) -> None:
    (Path(folder) / "README.md").write_text(render_model_card(meta))
