"""FLUX.1-dev-shaped step, dense vs CLEAR r16 (triton, tiled), both under torch.compile (inductor
fuses the elementwise ops that take ~38% of an eager CLEAR step at 4096², see profile_step.py).
An extra measurement beside `clear-surgery bench` (eager, the step the targets are stated for), not a substitute.
    python recipes/benchmarks/step_compiled.py [--tiny]   (--tiny: toy sizes on the CPU)
Writes $OUT/step_compiled.json."""
import json
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear
from clear_surgery.surgery.tools.bench import FLUX_DEV, TINY_FLUX_DEV, analyze_flux_dev, build_flux_dev, flux_inputs, time_ms

TINY = "--tiny" in sys.argv
device = "cpu" if TINY else "cuda"
config = TINY_FLUX_DEV if TINY else FLUX_DEV
sizes = [128] if TINY else [int(s) for s in os.environ.get("SIZES", "4096").split(",")]

report = analyze_flux_dev(config)
model = build_flux_dev(device, torch.float32 if TINY else torch.bfloat16, config)
rows = []


def measure(label, size, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(**inputs)  # compile + first run
        torch.cuda.synchronize() if device == "cuda" else None
        compile_s = time.perf_counter() - start
        ms = time_ms(lambda: compiled(**inputs), warmup=1, rep=3)
    row = dict(res=size, model=label, compiled_ms=ms, compile_and_first_run_s=compile_s)
    print(json.dumps(row), flush=True)
    return ms


for size in sizes:
    inputs = flux_inputs(model, size)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                     set_priority=True):
        dense = measure("dense", size, inputs)
    apply_clear(model, ClearConfig(radius=16, token_layout="tiled"), backend="triton" if device == "cuda" else "auto",
                analysis=report, verify=False)
    clear = measure("clear-r16", size, inputs)
    remove_clear(model)
    rows.append(dict(res=size, dense_ms=dense, clear_ms=clear, speedup=dense / clear))
    print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "step_compiled.json"), "w"), indent=1)
