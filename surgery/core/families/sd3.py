"""SD3 / SD3.5 (incl. dual attention and ``context_pre_only``) and the SD3 ControlNet: image tokens
first, made inside the model by its patch embedders; the grid read from the latent's shape."""

from __future__ import annotations

import functools

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from .. import tiny
from ..processors import ClearProcessorBase
from .base import ExportPlan, ModelFamily, TilePlan, grid_from_latent, latent_tokens, takes_control_image


class ClearJointAttnProcessor(ClearProcessorBase):
    """CLEAR version of diffusers' JointAttnProcessor2_0 (SD3: image tokens first)."""

    text_first = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        image_len = hidden_states.shape[1]

        def heads(x):  # (batch, tokens, heads * dim) -> (batch, tokens, heads, dim)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads)

        def normed(norm, x):  # q/k norms act on the last (head_dim) axis: layout does not matter
            return x if norm is None else norm(x)

        query = normed(attn.norm_q, heads(attn.to_q(hidden_states)))
        key = normed(attn.norm_k, heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            query = torch.cat([query, normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))], 1)
            key = torch.cat([key, normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))], 1)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], 1)

        hidden_states = self._attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def example_inputs(model, text_len, height, width, batch, dtype, device):
    cfg = model.config
    p = cfg.patch_size
    t = functools.partial(torch.randn, dtype=dtype, device=device)
    inputs = dict(
        hidden_states=t(batch, cfg.in_channels, height * p, width * p),
        encoder_hidden_states=t(batch, text_len, cfg.joint_attention_dim),
        pooled_projections=t(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 500.0, dtype=dtype, device=device),
        return_dict=False,
    )
    if takes_control_image(model):
        extra = getattr(cfg, "extra_conditioning_channels", 0) or 0
        inputs["controlnet_cond"] = t(batch, cfg.in_channels + extra, height * p, width * p)
    return inputs


class SD3Samples:
    """Distillation samples: latents (channels, h, w), joint embeddings, pooled; timestep = 1000 sigma."""

    name = "sd3"

    @staticmethod
    def encode_and_generate(pipe, prompts, s, generators, device) -> list[dict]:
        cfg = s.guidance is not None and s.guidance > 1
        tokenizer = getattr(pipe, "tokenizer_3", None)
        length = min(s.max_sequence_length, tokenizer.model_max_length) if tokenizer else s.max_sequence_length
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            max_sequence_length=length)
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


class SD3ForExport(torch.nn.Module):
    """SD3 / SD3.5 or the SD3 ControlNet for engines: tensor inputs only (the grid is the latent's shape)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.controlnet = takes_control_image(model)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, controlnet_cond=None):
        kwargs = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, timestep=timestep, return_dict=False)
        if controlnet_cond is not None:
            kwargs["controlnet_cond"] = controlnet_cond
        out = self.model(**kwargs)
        return tuple(out[0]) if self.controlnet else out[0]


def export_inputs(model, text_len, height, width, batch, dtype, device):
    inputs = example_inputs(model, text_len, height, width, batch, dtype, device)
    inputs.pop("return_dict")
    return inputs


def export_grid_dims(model) -> dict:
    patch = model.config.patch_size
    names = ["hidden_states"] + (["controlnet_cond"] if takes_control_image(model) else [])
    return {name: ((2, patch), (3, patch)) for name in names}


def export_outputs(model) -> list:
    if not takes_control_image(model):
        return ["sample"]
    return [f"block_sample_{i}" for i in range(model.config.num_layers)]


_TINY = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
             caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
             pos_embed_max_size=64)
# SD3 and SD3.5 differ as the real ones do (q/k norms, dual attention in the first block)
BUILTINS = {
    "tiny-sd3": ("SD3Transformer2DModel", _TINY),
    "tiny-sd35": ("SD3Transformer2DModel", dict(_TINY, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "tiny-sd3-controlnet": ("SD3ControlNetModel", dict(_TINY, num_layers=1)),
}


def tiny_pipeline(name: str, load_builtin):
    """StableDiffusion3Pipeline around tiny-sd3 / tiny-sd35."""
    import diffusers

    if name not in ("tiny-sd3", "tiny-sd35"):
        raise ValueError(f"no built-in pipeline for {name!r}: the SD3 ControlNet pipeline is not built in")
    parts = tiny.seeded(lambda: dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny.vae(),
                                     text_encoder=tiny.clip(32, 32), tokenizer=tiny.tokenizer(),
                                     text_encoder_2=tiny.clip(32, 32), tokenizer_2=tiny.tokenizer(),
                                     text_encoder_3=tiny.t5(32), tokenizer_3=tiny.tokenizer()), tiny.SEED + 1)
    return diffusers.StableDiffusion3Pipeline(transformer=load_builtin(name), **parts)


# tiny models of this family and their example calls, by coverage-table row: a built-in's name or a builder
# returning (model, forward kwargs[, text tokens, image tokens])
TINY_MODELS = {
    "SD3 (SD3Transformer2DModel)": "tiny-sd3",
    "SD3.5 (SD3Transformer2DModel, dual attention)": "tiny-sd35",
    "SD3 ControlNet (SD3ControlNetModel)": "tiny-sd3-controlnet",
}


FAMILY = ModelFamily(
    name="sd3",
    tiny_models=TINY_MODELS,
    controlnets=("SD3ControlNetModel",),
    # embedders, the final projection, a ControlNet's zero-initialized outputs, and every block's modulation
    # (one row per image: no speed to gain; FP8 there cost FLUX's testbed 2 dB)
    keep_high_precision=("context_embedder", "time_text_embed.*", "norm_out.*", "proj_out", "controlnet_blocks.*",
                         "pos_embed_input.*", "*.norm1.linear", "*.norm1_context.linear"),
    class_names=("SD3Transformer2DModel", "SD3ControlNetModel"),
    example_inputs=example_inputs,
    grid_from_call=grid_from_latent,
    image_tokens=latent_tokens,
    processors={JointAttnProcessor2_0: ClearJointAttnProcessor},
    # tokens are made inside the model by the patch embedders; proj_out is the last per-token op
    tile_plan=TilePlan(entry_lists=("block_controlnet_hidden_states",), token_modules=("pos_embed", "pos_embed_input"),
                       exit_modules=("proj_out",)),
    pipelines={"SD3Transformer2DModel": "StableDiffusion3Pipeline",
               "SD3ControlNetModel": "StableDiffusion3ControlNetPipeline"},
    builtins=BUILTINS,
    tiny_pipeline=tiny_pipeline,
    samples=SD3Samples,
    # text: CLIP's 77 tokens and T5's 256 (StableDiffusion3Pipeline's default max_sequence_length)
    export_plan=ExportPlan(SD3ForExport, export_inputs, export_grid_dims, export_outputs, pixels_per_token=16,
                           text_len=333),
    order=1,
)
