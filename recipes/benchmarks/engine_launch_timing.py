"""The engine kernel launched four ways at 4096² (FLUX shapes, r16, text first), each timed with CUDA events:
its ahead-of-time cubin through the driver with 12 arguments, its full PTX and the engine's 10-parameter PTX
JIT-compiled by the driver, and Triton's own launch (the triton-aot backend). On the GPU machine:

    python recipes/benchmarks/engine_launch_timing.py
"""
import tempfile

import cupy
import numpy as np
import torch

from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins.tensorrt_plugin import aot_launch
from clear_surgery.plugins.triton_aot import aot_kernel, aot_tile, spec_for, triton_aot_attention
from clear_surgery.surgery.tools.bench import time_ms

side = 256
q, k, v = (torch.randn(1, 512 + side * side, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
layout = TokenLayout(512, True, side, side, aot_tile(128))
out = torch.empty_like(q)
carrier = torch.empty((side, side), device="cuda", dtype=q.dtype)
fields = {"radius": 16.0, "text_first": 1, "tile_h": 8, "tile_w": 8, "scale": 0.0}
name, ptx, plan, shared = aot_launch(tuple(q.shape), (side, side), "bf16", fields, 1)
kernel = aot_kernel(spec_for(128, "bf16", 16.0, True, None, (8, 8), 0))
base = [np.uint64(t.data_ptr()) for t in (q, k, v, carrier)] + [np.int32(s) for s in plan.scalars] + [np.uint64(out.data_ptr())]
path = tempfile.mktemp(suffix=".cubin"); open(path, "wb").write(kernel.cubin)
runs = {"cubin (triton's ptxas), 12 args": (cupy.RawModule(path=path).get_function(name), base + [np.uint64(0)] * 2)}
for label, text, args in (("PTX 12 params, driver JIT", kernel.ptx, base + [np.uint64(0)] * 2), ("PTX 10 params (engine), driver JIT", ptx, base)):
    m = cupy.cuda.function.Module(); m.load(text.encode()); runs[label] = (m.get_function(name), args)
for label, (fn, args) in runs.items():
    print(label, round(time_ms(lambda: fn(plan.grid, plan.block, tuple(args), shared_mem=shared), 2, 5), 2), "ms", flush=True)
print("triton_aot_attention (torch launch)", round(time_ms(lambda: triton_aot_attention(q, k, v, layout, 16.0), 2, 5), 2), "ms")
