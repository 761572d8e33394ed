"""Where a FLUX.1-dev-shaped step's GPU time goes, dense vs CLEAR r16 (triton, tiled): one profiled
step (torch.profiler) after a warm-up, GPU kernel time summed per category. Shows how much of the
CLEAR step is still attention, i.e. the step speedup left if attention cost nothing.
    python recipes/benchmarks/profile_step.py [--tiny]   (--tiny: toy sizes on the CPU, a smoke test)
Writes $OUT/profile_step.json."""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear
from clear_surgery.surgery.tools.bench import FLUX_DEV, TINY_FLUX_DEV, analyze_flux_dev, build_flux_dev, flux_inputs

TINY = "--tiny" in sys.argv
device = "cpu" if TINY else "cuda"
config = TINY_FLUX_DEV if TINY else FLUX_DEV
size = 256 if TINY else int(os.environ.get("SIZE", 4096))
# kernel name fragments -> category (first match wins; names as CUDA kernels / CPU ops are called)
CATEGORIES = [("attention (CLEAR triton)", ("clear_fwd_kernel",)),
              ("attention (dense SDPA)", ("cudnn", "flash", "fmha", "attention", "sdpa")),
              ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "mm", "linear", "addmm")),
              ("elementwise / norm / rope", ("elementwise", "vectorized", "reduce", "norm", "mul", "add", "cat",
                                             "copy", "silu", "gelu", "tanh", "rotary", "index"))]


def categorize(name):
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def profiled_ms(model, inputs):
    with torch.no_grad():
        model(**inputs)  # warm-up (kernel compile, allocator)
        activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            model(**inputs)
    totals, top = {}, {}
    for event in prof.key_averages():
        if device == "cuda":  # GPU kernels only (the ops that launched them would count them twice)
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0
        if us <= 0:
            continue
        category = categorize(event.key)
        totals[category] = totals.get(category, 0.0) + us / 1e3
        top.setdefault(category, []).append((us / 1e3, event.key[:90]))
    return totals, {c: sorted(v, reverse=True)[:3] for c, v in top.items()}


report = analyze_flux_dev(config)
model = build_flux_dev(device, torch.float32 if TINY else torch.bfloat16, config)
inputs = flux_inputs(model, size)
result = dict(res=size)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                 set_priority=True):
    result["dense"], result["dense_top"] = profiled_ms(model, inputs)
apply_clear(model, ClearConfig(radius=16, token_layout="tiled"), backend="triton" if device == "cuda" else "auto",
            analysis=report, verify=False)
result["clear"], result["clear_top"] = profiled_ms(model, inputs)
remove_clear(model)
for kind in ("dense", "clear"):
    total = sum(result[kind].values())
    attention = sum(v for k, v in result[kind].items() if k.startswith("attention"))
    result[f"{kind}_total_ms"], result[f"{kind}_attention_ms"] = total, attention
    print(f"{kind}: total {total:.1f} ms, attention {attention:.1f} ms", json.dumps(result[kind]), flush=True)
rest = result["clear_total_ms"] - result["clear_attention_ms"]
result["speedup_profiled"] = result["dense_total_ms"] / result["clear_total_ms"]
result["speedup_if_attention_free"] = result["dense_total_ms"] / rest
print(json.dumps({k: v for k, v in result.items() if not k.endswith("_top")}), flush=True)
json.dump(result, open(os.path.join(os.environ.get("OUT", "."), "profile_step.json"), "w"), indent=1)
