"""Built-in tiny models: FLUX/SD3-architecture models (and whole tiny pipelines) built offline
from small configs with a fixed seed, so everything runs without the Hub."""

from __future__ import annotations

import torch

BUILTIN_PREFIX = "builtin:"
SEED = 0

_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
_SD3 = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=64)

# name -> (diffusers class name, config); the dev/schnell and SD3/SD3.5 pairs differ as the real ones do.
BUILTIN_MODELS = {
    "tiny-flux": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=True)),
    "tiny-flux-schnell": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=False)),
    "tiny-sd3": ("SD3Transformer2DModel", _SD3),
    "tiny-sd35": ("SD3Transformer2DModel", dict(_SD3, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "tiny-flux-controlnet": ("FluxControlNetModel", dict(_FLUX, guidance_embeds=True, num_layers=1,
                                                         num_single_layers=1)),
    "tiny-sd3-controlnet": ("SD3ControlNetModel", dict(_SD3, num_layers=1)),
}


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _fill_zero_parameters(model: torch.nn.Module) -> None:
    # ControlNets zero-initialize their output projections; a zero ControlNet would make every
    # comparison of its outputs vacuous, so the built-in ones get small random values there.
    for param in model.parameters():
        if param.count_nonzero() == 0:
            param.data.normal_(0, 0.02)


def load_builtin(name: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    import diffusers

    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; available: {builtin_names()}")
    class_name, config = BUILTIN_MODELS[key]

    def build():
        model = getattr(diffusers, class_name)(**config)
        if "ControlNet" in class_name:
            _fill_zero_parameters(model)
        return model

    model = _seeded(build, SEED).eval()
    return model.to(dtype) if dtype is not None else model


# --- whole tiny pipelines (text encoders, tokenizers, VAE, scheduler) -----------------------------

_WORDS = ("a photo of the an cat dog astronaut in space red blue green tree house city at night painting "
          "portrait landscape mountain river sunset beach car robot flower").split()


def tiny_tokenizer(max_length: int = 16):
    """A word-level tokenizer built in code (no download); enough for diffusers' pipelines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *_WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)


def _clip(hidden=32, projection=None, max_length=16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=2,
                            eos_token_id=3, pad_token_id=0, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(d_model=32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3)
    return T5EncoderModel(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.0,
                         scaling_factor=1.0).eval()


def tiny_pipeline(name: str):
    """builtin:tiny-flux / tiny-flux-schnell / tiny-sd3 / tiny-sd35 / tiny-flux-controlnet as a whole
    diffusers pipeline (FluxPipeline, StableDiffusion3Pipeline, FluxControlNetPipeline)."""
    import diffusers

    key = name.removeprefix(BUILTIN_PREFIX)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if key in ("tiny-flux", "tiny-flux-schnell", "tiny-flux-controlnet"):
        transformer = load_builtin("tiny-flux-schnell" if key == "tiny-flux-schnell" else "tiny-flux")

        def parts():
            return dict(scheduler=scheduler, vae=_vae(), text_encoder=_clip(), tokenizer=tiny_tokenizer(),
                        text_encoder_2=_t5(32), tokenizer_2=tiny_tokenizer())

        components = _seeded(parts, SEED + 1)
        if key == "tiny-flux-controlnet":
            return diffusers.FluxControlNetPipeline(transformer=transformer, controlnet=load_builtin(key),
                                                    **components)
        return diffusers.FluxPipeline(transformer=transformer, **components)
    if key in ("tiny-sd3", "tiny-sd35"):
        def parts():
            return dict(scheduler=scheduler, vae=_vae(), text_encoder=_clip(32, 32), tokenizer=tiny_tokenizer(),
                        text_encoder_2=_clip(32, 32), tokenizer_2=tiny_tokenizer(), text_encoder_3=_t5(32),
                        tokenizer_3=tiny_tokenizer())

        return diffusers.StableDiffusion3Pipeline(transformer=load_builtin(key), **_seeded(parts, SEED + 1))
    raise ValueError(f"no built-in pipeline {name!r}; available: builtin:tiny-flux, builtin:tiny-flux-schnell, "
                     "builtin:tiny-sd3, builtin:tiny-sd35, builtin:tiny-flux-controlnet")
