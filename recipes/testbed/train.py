"""Train the testbed: small FLUX-architecture models on real photographs, to measure what CLEAR does
to quality (random-weight models have no local attention to keep).

Stages (saved as diffusers folders under --out at the end):
  1. vae         a small AutoencoderKL (64x64 RGB -> 4 x 32x32 latents; --size 256: 256x256 -> 4 x 64x64),
                 reconstruction + tiny KL
  2. dev         FluxTransformer2DModel + its own text encoders (CLIP and T5, word-level tokenizer):
                 text-conditioned flow matching with 10% empty captions ...
  3. guidance    ... then guidance-distilled, as FLUX.1-dev: the guidance embedding learns
                 v_uncond + g (v_cond - v_uncond) of the frozen stage-2 model, g in [1, 5]
  4. schnell     a few-step model from dev, as FLUX.1-schnell from FLUX.1-dev: no guidance embedding,
                 started from dev's weights and trained by reflow on (noise, dev's 28-step sample at
                 guidance 3.5) pairs; sampled with 4 steps, shift 1
  5. controlnet  a FluxControlNetModel (2 double blocks, from dev's weights) for dev, conditioned on
                 the grayscale image (colorization); dev frozen

    python recipes/testbed/photos.py --out photos.safetensors        # where scikit-image is installed
    python recipes/testbed/train.py --photos photos.safetensors --out recipes/testbed/models --device cuda

--steps-scale shrinks every stage (a few steps on CPU: a smoke run); --max-minutes caps each stage's
time (the steps done are written to training.json); --replay training.json repeats a capped run's schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from photos import CAPTIONS, CropPool, PhotoCrops, gray, load_photos, read_photos  # noqa: E402

SIZE = 64  # training and sampling resolution (pixels), --size: 64 (the committed testbed) or 256
# the VAE's down blocks per size (each after the first halves the side) so that FLUX's 2x2 packing gives a
# 16x16 token grid at 64 px (32x32 latents) and 32x32 at 256 px (64x64 latents: r = 8 covers under a fifth)
VAE_BLOCKS = {64: 2, 256: 3}


def token_side() -> int:
    return SIZE // 2 ** VAE_BLOCKS[SIZE]
TEXT_LEN = 16
STEPS = dict(vae=3000, dev=8000, guidance=2500, schnell=3000, controlnet=3000)
# batches per size: at 256 px a quarter of the images (four times the tokens each), so that a step sees as many
# tokens as at 64 px and a stage's time cap buys as many steps; the VAE gets twice the pixels of the 64 px batch
BATCHES = {64: dict(vae=64, dev=256, guidance=256, schnell=256, controlnet=256),
           256: dict(vae=8, dev=64, guidance=64, schnell=64, controlnet=64)}
BATCH = BATCHES[SIZE]
LR = dict(vae=1e-3, dev=5e-4, guidance=2e-4, schnell=2e-4, controlnet=3e-4)
DEV_GUIDANCE, DEV_STEPS, SCHNELL_STEPS = 3.5, 28, 4
GUIDANCE_RANGE = (1.0, 5.0)
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))


# --- components -----------------------------------------------------------------------------------

def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    # an end token after every caption: CLIP pools there, so the pooled vector sees the whole caption
    word_level.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=TEXT_LEN)


def build_text_encoders(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LEN,
                                        bos_token_id=2, eos_token_id=3, pad_token_id=0, projection_dim=64))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3))
    return clip, t5


def build_vae():
    from diffusers import AutoencoderKL

    blocks = VAE_BLOCKS[SIZE]
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(32, 64, 64)[:blocks],
                         layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=SIZE, mid_block_add_attention=False)


def dev_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def schnell_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


class Text:
    """Captions -> (T5 embeddings, pooled CLIP), computed as FluxPipeline.encode_prompt does (padded to
    TEXT_LEN, no attention mask), so training and the saved pipeline see the same vectors."""

    def __init__(self, tokenizer, clip, t5, device):
        self.clip, self.t5, self.device = clip, t5, device
        texts = CAPTIONS + [""]
        ids = tokenizer(texts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
        self.ids = ids.input_ids.to(device)
        self.empty = len(CAPTIONS)

    def __call__(self, index: torch.Tensor):
        ids = self.ids[index]
        return self.t5(ids)[0], self.clip(ids).pooler_output


# --- helpers ----------------------------------------------------------------------------------------

def pack(latents):
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def ids(device):
    from diffusers import FluxPipeline

    img = FluxPipeline._prepare_latent_image_ids(1, token_side(), token_side(), device, torch.float32)
    return img, torch.zeros(TEXT_LEN, 3, device=device)


def velocity(model, x_t, sigma, embeds, pooled, guidance=None, **extra):
    img_ids, txt_ids = ids(x_t.device)
    kwargs = dict(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma,
                  img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **extra)
    if model.config.guidance_embeds:
        kwargs["guidance"] = guidance if guidance is not None else torch.ones_like(sigma)
    return model(**kwargs)[0]


def noisy(x0, generator=None, sigma=None):
    """x_t = (1 - s) x0 + s noise (logit-normal s, as SD3/FLUX training); the target is noise - x0."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if sigma is None:
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    s = sigma[:, None, None]
    return (1 - s) * x0 + s * noise, sigma, noise - x0


def random_guidance(n: int, device) -> torch.Tensor:
    """Guidance scales the guidance embedding and the ControlNet train on: uniform in GUIDANCE_RANGE."""
    low, high = GUIDANCE_RANGE
    return low + (high - low) * torch.rand(n, device=device)


class Stage:
    """One training loop: AdamW with warm-up and cosine decay, a progress bar, a time cap."""

    def __init__(self, name, params, args, record):
        from tqdm.auto import tqdm

        steps, lr, device, max_minutes = args.steps[name], LR[name], args.device, args.max_minutes
        self.name, self.steps, self.device, self.record = name, steps, device, record
        self.stop_at = args.stop_at.get(name, steps)  # --replay: where the recorded run stopped
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        warmup = max(1, min(200, steps // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warmup) * (0.5 + 0.5 * math.cos(math.pi * min(1, i / steps))))
        self.deadline = time.time() + 60 * max_minutes
        self.bar = tqdm(total=steps, desc=name, unit="step", mininterval=5)
        self.started, self.losses = time.time(), []

    def autocast(self):
        # fp32 (TF32 matmuls on CUDA): the models are small; bf16 autocast failed in cuBLAS on the H200
        return torch.autocast(self.device.type, enabled=False)

    def __iter__(self):
        for step in range(self.stop_at):
            if time.time() > self.deadline:
                print(f"{self.name}: time cap reached after {step} steps", flush=True)
                break
            yield step
        self.bar.close()
        tail = self.losses[-100:]
        self.record[self.name] = dict(steps=len(self.losses), planned_steps=self.steps,
                                      seconds=round(time.time() - self.started, 1),
                                      final_loss=round(sum(tail) / max(1, len(tail)), 5))
        print(f"{self.name}: {self.record[self.name]}", flush=True)

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(loss.item())
        self.bar.update()
        if len(self.losses) % 500 == 0:
            self.bar.set_postfix(loss=f"{sum(self.losses[-500:]) / 500:.4f}")


# --- stages ---------------------------------------------------------------------------------------

def train_vae(crops, args, record):
    vae = build_vae().to(args.device).train()
    stage = Stage("vae", vae.parameters(), args, record)
    for _ in stage:
        x, _ = crops.batch(BATCH["vae"])
        with stage.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()
        stage.step(loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # FLUX-style latent normalization: (z - shift) * scale has mean 0, std 1
        z = torch.cat([vae.encode(crops.batch(64)[0]).latent_dist.sample() for _ in range(8)])
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae


@torch.no_grad()
def latent_pool(vae, crops, count, condition=False):
    """``count`` random crops encoded and packed as the pipelines do (their photo indices too); with
    ``condition`` also the grayscale conditions encoded as FluxControlNetPipeline encodes control images."""
    cfg = vae.config
    latents, conds, labels = [], [], []
    for _ in range(0, count, 256):
        x, index = crops.batch(256)  # fresh flips of the pooled crops
        latents.append(pack((vae.encode(x).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor))
        if condition:
            conds.append(pack((vae.encode(gray(x)).latent_dist.sample() - cfg.shift_factor) * cfg.scaling_factor))
        labels.append(index)
    return torch.cat(latents), (torch.cat(conds) if condition else None), torch.cat(labels)


def train_dev(vae, crops, tokenizer, args, record):
    from diffusers import FluxTransformer2DModel

    device = args.device
    clip, t5 = build_text_encoders(len(tokenizer))
    clip, t5 = clip.to(device).train(), t5.to(device).train()
    model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True).to(device).train()
    text = Text(tokenizer, clip, t5, device)
    pool, _, labels = latent_pool(vae, crops, args.pool)
    params = [*model.parameters(), *clip.parameters(), *t5.parameters()]
    stage = Stage("dev", params, args, record)
    for _ in stage:
        pick = torch.randint(len(pool), (BATCH["dev"],), device=device)
        caption = torch.where(torch.rand(len(pick), device=device) < 0.1, text.empty, labels[pick])
        x_t, sigma, target = noisy(pool[pick])
        with stage.autocast():
            embeds, pooled = text(caption)
            pred = velocity(model, x_t, sigma, embeds, pooled)
        stage.step(F.mse_loss(pred.float(), target))

    # guidance distillation: the guidance embedding learns the classifier-free combination
    clip.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    stage = Stage("guidance", model.parameters(), args, record)
    for _ in stage:
        pick = torch.randint(len(pool), (BATCH["guidance"],), device=device)
        x_t, sigma, _ = noisy(pool[pick])
        g = random_guidance(len(pick), device)
        with stage.autocast():
            with torch.no_grad():
                embeds, pooled = text(labels[pick])
                empty_embeds, empty_pooled = text(torch.full_like(pick, text.empty))
                v_cond = velocity(teacher, x_t, sigma, embeds, pooled)
                v_uncond = velocity(teacher, x_t, sigma, empty_embeds, empty_pooled)
                target = v_uncond + g[:, None, None] * (v_cond - v_uncond)
            pred = velocity(model, x_t, sigma, embeds, pooled, guidance=g)
        stage.step(F.mse_loss(pred.float(), target.float()))
    del teacher
    return model.eval().requires_grad_(False), clip, t5


def flux_pipeline(transformer, vae, clip, t5, tokenizer, scheduler):
    from diffusers import FluxPipeline

    return FluxPipeline(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=copy.deepcopy(tokenizer), scheduler=scheduler)


@torch.no_grad()
def reflow_pairs(dev_pipe, count, device, seed):
    """(noise, dev's 28-step sample at guidance 3.5, caption index) for every caption in turn."""
    g = torch.Generator(device).manual_seed(seed)
    noises, samples, labels = [], [], []
    for start in range(0, count, 512):
        index = torch.arange(start, min(count, start + 512), device=device) % len(CAPTIONS)
        noise = torch.randn(len(index), token_side() ** 2, 16, generator=g, device=device)
        out = dev_pipe(prompt=[CAPTIONS[i] for i in index.tolist()], latents=noise, height=SIZE, width=SIZE,
                       num_inference_steps=DEV_STEPS, guidance_scale=DEV_GUIDANCE, output_type="latent",
                       max_sequence_length=TEXT_LEN).images
        noises.append(noise)
        samples.append(out.float())
        labels.append(index)
    return torch.cat(noises), torch.cat(samples), torch.cat(labels)


def train_schnell(dev, dev_pipe, text, args, record):
    from diffusers import FluxTransformer2DModel

    device = args.device
    model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=False).to(device)
    missing, unexpected = model.load_state_dict(dev.state_dict(), strict=False)
    assert not missing and all(k.startswith("time_text_embed.guidance_embedder") for k in unexpected), (missing,
                                                                                                     unexpected)
    noise, x0, labels = reflow_pairs(dev_pipe, args.pairs, device, seed=1)
    grid = torch.arange(1, SCHNELL_STEPS + 1, device=device) / SCHNELL_STEPS  # the sigmas schnell samples at
    model.train()
    stage = Stage("schnell", model.parameters(), args, record)
    for _ in stage:
        pick = torch.randint(len(x0), (BATCH["schnell"],), device=device)
        sigma = torch.where(torch.rand(len(pick), device=device) < 0.5, grid[torch.randint(len(grid), pick.shape,
                                                                                             device=device)],
                            torch.rand(len(pick), device=device))
        s = sigma[:, None, None]
        x_t, target = (1 - s) * x0[pick] + s * noise[pick], noise[pick] - x0[pick]
        with stage.autocast():
            with torch.no_grad():
                embeds, pooled = text(labels[pick])
            pred = velocity(model, x_t, sigma, embeds, pooled)
        stage.step(F.mse_loss(pred.float(), target))
    return model.eval().requires_grad_(False)


def train_controlnet(dev, vae, crops, text, args, record):
    from diffusers import FluxControlNetModel

    device = args.device
    controlnet = FluxControlNetModel.from_transformer(dev, num_layers=TRANSFORMER["num_layers"], num_single_layers=0,
                                                      attention_head_dim=TRANSFORMER["attention_head_dim"],
                                                      num_attention_heads=TRANSFORMER["num_attention_heads"])
    controlnet = controlnet.to(device).train()
    pool, conds, labels = latent_pool(vae, crops, args.pool, condition=True)
    stage = Stage("controlnet", controlnet.parameters(), args, record)
    img_ids, txt_ids = ids(device)
    for _ in stage:
        pick = torch.randint(len(pool), (BATCH["controlnet"],), device=device)
        x_t, sigma, target = noisy(pool[pick])
        g = random_guidance(len(pick), device)
        with stage.autocast():
            with torch.no_grad():
                embeds, pooled = text(labels[pick])
            blocks, singles = controlnet(hidden_states=x_t, controlnet_cond=conds[pick], encoder_hidden_states=embeds,
                                         pooled_projections=pooled, timestep=sigma, guidance=g, img_ids=img_ids,
                                         txt_ids=txt_ids, return_dict=False)
            pred = velocity(dev, x_t, sigma, embeds, pooled, guidance=g, controlnet_block_samples=blocks,
                            controlnet_single_block_samples=singles)
        stage.step(F.mse_loss(pred.float(), target))
    return controlnet.eval().requires_grad_(False)


# --- main -----------------------------------------------------------------------------------------

def set_size(size: int) -> None:
    """Train (and sample) at ``size`` pixels a side (a key of VAE_BLOCKS)."""
    global SIZE, BATCH
    if size not in VAE_BLOCKS:
        raise ValueError(f"--size must be one of {sorted(VAE_BLOCKS)}, got {size}")
    SIZE, BATCH = size, BATCHES[size]


def save(module, folder: Path):
    module.to("cpu").save_pretrained(folder, safe_serialization=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the CLEAR testbed (dev, schnell, ControlNet).")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--photos", type=Path, help="photos packed by photos.py (default: read scikit-image's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--max-minutes", type=float, default=float("inf"), help="time cap per stage")
    parser.add_argument("--replay", type=Path, help="a training.json: plan each stage as it did and stop where it "
                                                     "stopped (reproduces a run that hit --max-minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SIZE, choices=sorted(VAE_BLOCKS),
                        help="image side in pixels: 64 (16x16 tokens) or 256 (32x32 tokens)")
    args = parser.parse_args(argv)
    set_size(args.size)
    args.device = torch.device(args.device)
    args.steps = {k: max(2, round(v * args.steps_scale)) for k, v in STEPS.items()}
    args.stop_at = {}
    if args.replay:
        done = json.loads(args.replay.read_text())
        args.steps_scale = done["steps_scale"]
        args.steps = {k: done[k]["planned_steps"] for k in STEPS}
        args.stop_at = {k: done[k]["steps"] for k in STEPS}
    args.pool = max(256, round(16384 * min(1.0, args.steps_scale)))
    args.pairs = max(64, round(4096 * min(1.0, args.steps_scale)))
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    photos = read_photos(args.photos) if args.photos else load_photos(short_side=2 * SIZE)
    crops = CropPool(PhotoCrops(photos, SIZE, seed=args.seed, device=args.device), args.pool)
    record = dict(steps_scale=args.steps_scale, batch=BATCH, learning_rate=LR, size=SIZE,
                  transformer=TRANSFORMER, captions=CAPTIONS)
    args.out.mkdir(parents=True, exist_ok=True)

    vae = train_vae(crops, args, record)
    tokenizer = build_tokenizer()
    dev, clip, t5 = train_dev(vae, crops, tokenizer, args, record)
    dev_pipe = flux_pipeline(dev, vae, clip, t5, tokenizer, dev_scheduler())
    dev_pipe.set_progress_bar_config(disable=True)
    text = Text(tokenizer, clip, t5, args.device)
    schnell = train_schnell(dev, dev_pipe, text, args, record)
    controlnet = train_controlnet(dev, vae, crops, text, args, record)

    dev_pipe.to("cpu").save_pretrained(args.out / "dev", safe_serialization=True)
    flux_pipeline(schnell, vae, clip, t5, tokenizer, schnell_scheduler()).to("cpu").save_pretrained(
        args.out / "schnell", safe_serialization=True)
    save(controlnet, args.out / "controlnet")
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
