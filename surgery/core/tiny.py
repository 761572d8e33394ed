"""Parts of the built-in tiny pipelines (tokenizer, text encoders, VAE), built in code from small
configs with a fixed seed, so everything runs offline. Family modules assemble them."""

from __future__ import annotations

import torch

SEED = 0

_WORDS = ("a photo of the an cat dog astronaut in space red blue green tree house city at night painting "
          "portrait landscape mountain river sunset beach car robot flower").split()


def seeded(build, seed: int = SEED):
    """build() under a fixed seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def fill_zero_parameters(model: torch.nn.Module) -> None:
    # ControlNets zero-initialize their output projections; a zero ControlNet would make every
    # comparison of its outputs vacuous, so the built-in ones get small random values there.
    for param in model.parameters():
        if param.count_nonzero() == 0:
            param.data.normal_(0, 0.02)


def tokenizer(max_length: int = 16):
    """A word-level tokenizer built in code (no download); enough for diffusers' pipelines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *_WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=max_length)


def clip(hidden=32, projection=None, max_length=16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=2,
                            eos_token_id=3, pad_token_id=0, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5(d_model=32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3)
    return T5EncoderModel(config).eval()


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.0,
                         scaling_factor=1.0).eval()
