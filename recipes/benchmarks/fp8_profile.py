"""Where an FP8 attention call's time goes: the CUDA kernels of gluon (bf16) and gluon-fp8 calls at FLUX
shapes (24 heads x 128, 512 text tokens, r16, 8x8 tiles), from torch.profiler, five calls each.

    python recipes/benchmarks/fp8_profile.py [RESOLUTION]     # default 4096 (256 x 256 tokens)
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins.gluon_backend import gluon_clear_attention
from clear_surgery.plugins.gluon_fp8_backend import gluon_fp8_clear_attention

resolution = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
layout = TokenLayout(512, True, resolution // 16, resolution // 16, (8, 8))
q, k, v = (torch.randn(1, layout.seq_len, 24, 128, device="cuda").to(torch.bfloat16) for _ in range(3))
for name, attention in (("gluon (bf16)", gluon_clear_attention), ("gluon-fp8", gluon_fp8_clear_attention)):
    for _ in range(3):
        attention(q, k, v, layout, 16)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            attention(q, k, v, layout, 16)
        torch.cuda.synchronize()
    print(f"===== {name}, {resolution}², 5 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
