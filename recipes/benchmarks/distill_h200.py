"""Distillation step time and peak memory: the FLUX.1-dev-shaped transformer (random bf16 weights)
trained as recipes/flux-dev-r16.toml does (bf16 autocast, fp32 master copies of the trained
attention tensors, AdamW, gradient checkpointing, flow-matching + output + attention loss), at
1024x1024, batch 2, for the flex and triton backends. Writes $OUT/distill.json.
    python recipes/benchmarks/distill_h200.py [--tiny]   (--tiny: a toy model on the CPU)
    RES=2048 BATCH=1 BACKENDS=flex python recipes/benchmarks/distill_h200.py   (other sizes / backends)
    torchrun --nproc_per_node 2 recipes/benchmarks/distill_h200.py   (DDP, triton only: distill-ddp.json)"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline

from clear_surgery.surgery import apply_clear
from clear_surgery.surgery.tools.bench import FLUX_DEV, TINY_FLUX_DEV, analyze_flux_dev, build_flux_dev
from clear_surgery.surgery.tools.distillation import Distiller, RandomSamples, load_recipe
from clear_surgery.surgery.tools.launch import init_from_torchrun

TINY = "--tiny" in sys.argv
DDP = init_from_torchrun()
rank = torch.distributed.get_rank() if DDP else 0
device = "cpu" if TINY else f"cuda:{torch.cuda.current_device()}"
config = dict(TINY_FLUX_DEV, num_single_layers=4) if TINY else FLUX_DEV
size, batch, steps, warmup = (128, 2, 3, 1) if TINY else (int(os.environ.get("RES", 1024)),
                                                           int(os.environ.get("BATCH", 2)), 6, 2)
recipe_file = Path(__file__).resolve().parents[1] / "flux-dev-r16.toml"
out = Path(os.environ.get("OUT", "/tmp"))
side = size // 16
text = 512
ids = dict(img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
           txt_ids=torch.zeros(text, 3))
shapes = dict(latents=(side * side, config["in_channels"]), prompt_embeds=(text, config["joint_attention_dim"]),
              pooled_prompt_embeds=(config["pooled_projection_dim"],))
report = analyze_flux_dev(config)
rows = []
default_backends = "reference,flex" if TINY else "triton" if DDP else "flex,triton"
for backend in os.environ.get("BACKENDS", default_backends).split(","):
    recipe = load_recipe(recipe_file, [f'output.dir="{out / ("distill-" + backend)}"', f"train.batch_size={batch}",
                                       "train.gradient_accumulation_steps=1", "data.holdout=1",
                                       f'clear.backend="{backend}"', f"train.steps={steps}"])
    model = build_flux_dev(device, torch.bfloat16, config)
    apply_clear(model, recipe.clear_config(), analysis=report, verify=False)
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device != "cpu" else None
    distiller = Distiller(recipe, model=model, dataset=RandomSamples(shapes, 64, fixed=ids), device=device,
                          progress=False)
    times = []
    for i in range(steps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        values = distiller.step()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(backend, i, f"{times[-1]:.3f}s", {k: round(v, 4) for k, v in values.items()}, flush=True)
    row = dict(backend=backend, flex_positions=os.environ.get("CLEAR_FLEX_POSITIONS", "tables"), res=size, batch=batch, processes=distiller.world, token_layout=recipe.clear.token_layout,
               radius=recipe.clear.radius, trained_tensors=len(distiller.trained_names),
               trained_params=sum(p.numel() for p in distiller.trained.values()),
               step_s=sorted(times[warmup:])[len(times[warmup:]) // 2], step_times_s=times,
               weights_gib=weights_gib,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None)
    rows.append(row)
    if rank == 0:
        print(json.dumps(row), flush=True)
    del distiller, model
if rank == 0:
    json.dump({"device": torch.cuda.get_device_name() if device != "cpu" else "cpu", "rows": rows},
              open(out / ("distill-ddp.json" if DDP else "distill.json"), "w"), indent=1)
if DDP:
    torch.distributed.destroy_process_group()
