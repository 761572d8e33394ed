"""FLUX.1-dev-shaped transformer step (random bf16 weights) at one size: dense (SDPA, one cold run at 8192²)
and CLEAR with each attention backend given, same model, same inputs, same run.
    python recipes/benchmarks/step_backends.py [SIZE] [BACKEND ...]   (default 8192 triton gluon;
    writes $OUT/step_backends.json)"""
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear
from clear_surgery.surgery.tools.bench import analyze_flux_dev, build_flux_dev, flux_inputs, time_ms

size = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
backends = sys.argv[2:] or ["triton", "gluon"]
radius = 16.0
report = analyze_flux_dev()
model = build_flux_dev("cuda")
inputs = flux_inputs(model, size)
row = dict(res=size, tokens=inputs["hidden_states"].shape[1] + 512, radius=radius, token_layout="tiled")
with torch.no_grad():
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                     set_priority=True):
        row["dense_ms"] = time_ms(lambda: model(**inputs), warmup=0 if size >= 8192 else 1, rep=1)
    print(json.dumps(row), flush=True)
    for backend in backends:
        apply_clear(model, ClearConfig(radius=radius, token_layout="tiled"), backend=backend, analysis=report,
                    verify=False)
        row[f"clear_ms_{backend}"] = time_ms(lambda: model(**inputs), warmup=1, rep=2)
        row[f"speedup_{backend}"] = row["dense_ms"] / row[f"clear_ms_{backend}"]
        remove_clear(model)
        print(json.dumps(row), flush=True)
Path(os.environ.get("OUT", ".")).mkdir(parents=True, exist_ok=True)
(Path(os.environ.get("OUT", ".")) / "step_backends.json").write_text(json.dumps(row, indent=1))
