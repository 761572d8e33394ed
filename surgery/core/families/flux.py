"""FLUX.1 (dev, schnell) and its ControlNet: packed image tokens after the text tokens, the grid
read from ``img_ids``."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from .. import tiny
from ..processors import ClearProcessorBase
from .base import (
    ExportPlan,
    ModelFamily,
    TilePlan,
    flux_like_inputs,
    forward_signature,
    grid_from_ids,
    image_grid,
    images_from_ids,
    packed_tokens,
    takes_control_image,
)


class ClearFluxAttnProcessor(ClearProcessorBase):
    """CLEAR version of diffusers' FluxAttnProcessor (text tokens first)."""

    text_first = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def example_inputs(model, text_len, height, width, batch, dtype, device):
    """The FLUX-style call, plus the control image for a ControlNet."""
    inputs = flux_like_inputs(model, text_len, height, width, batch, dtype, device)
    if takes_control_image(model):
        cfg = model.config
        extra = getattr(cfg, "num_extra_conditioning_channels", 0) or 0
        inputs["controlnet_cond"] = torch.randn(batch, height * width, cfg.in_channels + extra, dtype=dtype,
                                                device=device)
        if getattr(cfg, "num_mode", None):
            inputs["controlnet_mode"] = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return inputs


def pipeline_kwargs(pipe) -> dict:
    """FLUX pipelines take the T5 sequence length; at most what the T5 tokenizer allows."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    return {"max_sequence_length": min(512, tokenizer.model_max_length)} if tokenizer is not None else {}


class FluxSamples:
    """Distillation samples: packed latents (tokens, 64), T5 embeddings, pooled CLIP, position ids;
    timestep = sigma."""

    name = "flux"

    @staticmethod
    def encode_and_generate(pipe, prompts, s, generators, device, controls=None) -> list[dict]:
        """``controls``: one condition image per prompt for a ControlNet pipeline; each sample then keeps the
        ControlNet's input as the pipeline made it (the condition's packed latents)."""
        length = min(s.max_sequence_length, pipeline_kwargs(pipe).get("max_sequence_length", s.max_sequence_length))
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      max_sequence_length=length)
        kwargs = dict(guidance_scale=s.guidance) if s.guidance is not None else {}
        seen = {}
        if controls is not None:
            kwargs.update(control_image=controls, controlnet_conditioning_scale=s.controlnet_scale)

            def keep(module, args, call):  # the condition as the pipeline encoded it (the same every step)
                seen.setdefault("cond", call["controlnet_cond"])

            hook = pipe.controlnet.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=s.height, width=s.width,
                           num_inference_steps=s.inference_steps, generator=generators, output_type="latent",
                           **kwargs).images
        finally:
            if controls is not None:
                hook.remove()
        grid = 2 * (s.height // (pipe.vae_scale_factor * 2)), 2 * (s.width // (pipe.vae_scale_factor * 2))
        img_ids = pipe._prepare_latent_image_ids(1, grid[0] // 2, grid[1] // 2, device, latents.dtype)
        control = {"controlnet_cond": seen["cond"]} if controls is not None else {}
        return [dict(latents=latents[i], prompt_embeds=embeds[i], pooled_prompt_embeds=pooled[i], txt_ids=text_ids,
                     img_ids=img_ids, **{k: v[i] for k, v in control.items()}) for i in range(len(prompts))]

    @staticmethod
    def controlnet_residuals(controlnet, inputs: dict, batch: dict, scale: float) -> dict:
        """The ControlNet's residuals for the transformer call ``inputs`` (a batch with ``controlnet_cond``), as
        the transformer takes them."""
        if "controlnet_cond" not in batch:
            raise ValueError("the samples hold no ControlNet condition: they were made without a ControlNet")
        takes = forward_signature(type(controlnet)).parameters
        blocks, singles = controlnet(**{k: v for k, v in inputs.items() if k in takes},
                                     controlnet_cond=batch["controlnet_cond"], conditioning_scale=scale)
        return dict(controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                    controlnet_blocks_repeat=controlnet.input_hint_block is not None)

    @staticmethod
    def model_inputs(model, batch: dict, noisy: torch.Tensor, sigma: torch.Tensor, guidance: float | None) -> dict:
        inputs = dict(hidden_states=noisy, encoder_hidden_states=batch["prompt_embeds"],
                      pooled_projections=batch["pooled_prompt_embeds"], timestep=sigma,
                      img_ids=batch["img_ids"][0], txt_ids=batch["txt_ids"][0], return_dict=False)
        if getattr(model.config, "guidance_embeds", False):
            inputs["guidance"] = torch.full_like(sigma, 3.5 if guidance is None else guidance)
        return inputs


class FluxForExport(torch.nn.Module):
    """FLUX.1 or its ControlNet with the image grid in input shapes, for engines: latents come as
    (batch, rows, cols, channels) (FluxPipeline's packed latents, reshaped) and the position ids are
    built inside from those sizes, as FluxPipeline builds them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.controlnet = takes_control_image(model)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance=None,
                controlnet_cond=None):
        batch, rows, cols, channels = hidden_states.shape
        axes = len(self.model.config.axes_dims_rope)
        like = dict(device=hidden_states.device, dtype=hidden_states.dtype)
        img_ids = torch.zeros(rows, cols, axes, **like)
        img_ids[..., 1] = torch.arange(rows, **like)[:, None]
        img_ids[..., 2] = torch.arange(cols, **like)[None, :]
        kwargs = dict(hidden_states=hidden_states.reshape(batch, rows * cols, channels),
                      encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                      timestep=timestep, img_ids=img_ids.reshape(rows * cols, axes),
                      txt_ids=torch.zeros(encoder_hidden_states.shape[1], axes, **like), return_dict=False)
        if guidance is not None:
            kwargs["guidance"] = guidance
        if controlnet_cond is not None:
            kwargs["controlnet_cond"] = controlnet_cond.reshape(batch, rows * cols, controlnet_cond.shape[-1])
        with image_grid(rows, cols):
            out = self.model(**kwargs)
        return tuple(t for part in out for t in part) if self.controlnet else out[0]


def export_inputs(model, text_len, height, width, batch, dtype, device):
    packed = example_inputs(model, text_len, height, width, batch, dtype, device)
    inputs = {k: packed[k] for k in ("encoder_hidden_states", "pooled_projections", "timestep", "guidance") if k in packed}
    inputs["hidden_states"] = packed["hidden_states"].reshape(batch, height, width, -1)
    if "controlnet_cond" in packed:
        inputs["controlnet_cond"] = packed["controlnet_cond"].reshape(batch, height, width, -1)
    return inputs


def export_grid_dims(model) -> dict:
    names = ["hidden_states"] + (["controlnet_cond"] if takes_control_image(model) else [])
    return {name: ((1, 1), (2, 1)) for name in names}


def export_outputs(model) -> list:
    if not takes_control_image(model):
        return ["sample"]
    cfg = model.config
    return ([f"block_sample_{i}" for i in range(cfg.num_layers)]
            + [f"single_block_sample_{i}" for i in range(cfg.num_single_layers)])


_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
# dev and schnell differ as the real ones do (guidance embedding)
BUILTINS = {
    "tiny-flux": ("FluxTransformer2DModel", dict(_TINY, guidance_embeds=True)),
    "tiny-flux-schnell": ("FluxTransformer2DModel", dict(_TINY, guidance_embeds=False)),
    "tiny-flux-controlnet": ("FluxControlNetModel", dict(_TINY, guidance_embeds=True, num_layers=1,
                                                         num_single_layers=1)),
}


def tiny_pipeline(name: str, load_builtin):
    """FluxPipeline around tiny-flux / tiny-flux-schnell; FluxControlNetPipeline for tiny-flux-controlnet."""
    import diffusers

    transformer = load_builtin("tiny-flux-schnell" if name == "tiny-flux-schnell" else "tiny-flux")
    parts = tiny.seeded(lambda: dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny.vae(),
                                     text_encoder=tiny.clip(), tokenizer=tiny.tokenizer(), text_encoder_2=tiny.t5(32),
                                     tokenizer_2=tiny.tokenizer()), tiny.SEED + 1)
    if name == "tiny-flux-controlnet":
        return diffusers.FluxControlNetPipeline(transformer=transformer, controlnet=load_builtin(name), **parts)
    return diffusers.FluxPipeline(transformer=transformer, **parts)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
# the released model's architecture (FLUX.1-schnell has the same but no guidance embedding)
REAL_CONFIGS = {"FLUX.1-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))}

TINY_MODELS = {
    "FLUX.1 (FluxTransformer2DModel)": "tiny-flux",
    "FLUX.1 ControlNet (FluxControlNetModel)": "tiny-flux-controlnet",
}


FAMILY = ModelFamily(
    name="flux",
    tiny_models=TINY_MODELS,
    real_configs=REAL_CONFIGS,
    controlnets=("FluxControlNetModel",),
    loss_stacks=("single_transformer_blocks", "transformer_blocks"),
    # embedders, the final projection, a ControlNet's input and zero-initialized outputs, and every block's
    # modulation (one row per image: no speed to gain, and FP8 there cost 2 dB on the trained testbed,
    # recipes/testbed/results/fp8-r8)
    keep_high_precision=("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out",
                         "controlnet_x_embedder", "controlnet_blocks.*", "controlnet_single_blocks.*",
                         "*.norm1.linear", "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear"),
    class_names=("FluxTransformer2DModel", "FluxControlNetModel"),
    example_inputs=example_inputs,
    grid_from_call=grid_from_ids,
    image_tokens=packed_tokens,
    images_from_call=images_from_ids,  # FLUX.1 Kontext: the reference image after the target
    processors={FluxAttnProcessor: ClearFluxAttnProcessor},
    tile_plan=TilePlan(entry_tensors=("hidden_states", "controlnet_cond"),
                       entry_lists=("controlnet_block_samples", "controlnet_single_block_samples"), ids="img_ids"),
    pipelines={"FluxTransformer2DModel": "FluxPipeline", "FluxControlNetModel": "FluxControlNetPipeline"},
    latent_packing=2,
    pipeline_kwargs=pipeline_kwargs,
    builtins=BUILTINS,
    tiny_pipeline=tiny_pipeline,
    samples=FluxSamples,
    export_plan=ExportPlan(FluxForExport, export_inputs, export_grid_dims, export_outputs, pixels_per_token=16,
                           text_len=512),
    order=0,
)
