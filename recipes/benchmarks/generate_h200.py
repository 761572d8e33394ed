"""4096² and 8192² generation on one GPU with a FLUX.1-dev-shaped CLEAR transformer (random bf16
weights) and the FLUX VAE architecture (random weights), text embeddings given directly (no text
encoders). Records per-stage time (denoise, VAE decode) and peak GPU memory to $OUT/generate.json.
    python recipes/benchmarks/generate_h200.py [--tiny]   (--tiny: toy sizes on the CPU)"""
import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

from clear_surgery.surgery import ClearConfig, apply_clear
from clear_surgery.surgery.tools.bench import FLUX_DEV, TINY_FLUX_DEV, analyze_flux_dev, build_flux_dev

TINY = "--tiny" in sys.argv
device = "cpu" if TINY else "cuda"
dtype = torch.float32 if TINY else torch.bfloat16
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
           use_post_quant_conv=False, sample_size=1024)  # sample_size sets the VAE tile size (FLUX: 1024)
config = TINY_FLUX_DEV if TINY else FLUX_DEV
vae_config = dict(VAE, block_out_channels=(32, 32, 32, 32), norm_num_groups=8) if TINY else VAE
sizes = [128, 256] if TINY else [4096, 8192]


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


report = analyze_flux_dev(config)
transformer = build_flux_dev(device, dtype, config)
apply_clear(transformer, ClearConfig(radius=16, token_layout="tiled"), backend="reference" if TINY else "triton",
            analysis=report, verify=False)
with torch.device("meta"):
    vae = AutoencoderKL(**vae_config)
vae = vae.to_empty(device=device).to(dtype)
with torch.no_grad():
    for p in vae.parameters():
        p.normal_(0, 0.02)
vae.enable_tiling()
pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                    text_encoder_2=None, tokenizer_2=None, transformer=transformer)
embeds = torch.randn(1, 512, config["joint_attention_dim"], device=device, dtype=dtype)
pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype)
rows = []
for size in sizes:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=size, width=size,
                       num_inference_steps=2, guidance_scale=3.5, output_type="latent").images
    sync()
    t1 = time.perf_counter()
    denoise_peak = peak_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        pil = pipe.image_processor.postprocess(image, output_type="pil")[0]
    sync()
    t2 = time.perf_counter()
    row = dict(res=size, steps=2, denoise_s=t1 - t0, decode_s=t2 - t1, peak_gib_denoise=denoise_peak,
               peak_gib_decode=peak_gib(), image=list(pil.size))
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows},
          open(os.path.join(os.environ.get("OUT", "/tmp"), "generate.json"), "w"), indent=1)
