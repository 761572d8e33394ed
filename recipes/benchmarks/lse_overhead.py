"""Cost of return_lse=True in the triton kernel: FLUX shapes (24 heads x 128, 512 text tokens, bf16),
tile layout 8x8, r16, at 4096² and 8192². Run on a GPU machine: python recipes/benchmarks/lse_overhead.py"""

import torch

from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins.triton_backend import triton_clear_attention
from clear_surgery.surgery.tools.bench import time_ms

print(torch.cuda.get_device_name(), torch.__version__)
for side in (4096, 8192):
    g = side // 16
    layout = TokenLayout(512, True, g, g, (8, 8))
    n = 512 + g * g
    q, k, v = (torch.randn(1, n, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plain = time_ms(lambda: triton_clear_attention(q, k, v, layout, 16))
    lse = time_ms(lambda: triton_clear_attention(q, k, v, layout, 16, return_lse=True))
    print(f"{side}^2 r16 triton tiled: {plain:.2f} ms, with return_lse {lse:.2f} ms")
