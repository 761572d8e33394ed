"""The self-contained kernel (triton-aot backend): exact against the reference on CPU under the
interpreter, and on the GPU, launched both from PyTorch and through the CUDA driver with exactly the
kernel, grid and arguments the TensorRT plugin's AOT step hands TensorRT."""


import pytest
import torch

triton = pytest.importorskip("triton")

from clear_surgery.plugins import TokenLayout, attention, reference_attention  # noqa: E402
from clear_surgery.plugins.triton_aot import aot_tile, triton_aot_attention  # noqa: E402
from conftest import check_under_interpreter, rel_err  # noqa: E402

# (batch, heads, head_dim, text_len, text_first, grid h, grid w, radius, tile, dtype)
INTERPRET_CASES = [
    (2, 2, 16, 5, True, 9, 11, 2.5, [4, 8], "float32"),  # ragged edge tiles both ways, batch 2
    (1, 1, 16, 7, False, 13, 6, 3, [4, 8], "float32"),  # text last, non-square
    (1, 2, 64, 20, True, 21, 16, 5, [8, 8], "bfloat16"),
    (2, 1, 32, 9, False, 16, 24, 40, [8, 8], "float32"),  # r beyond the grid: every tile full
    (1, 1, 16, 70, True, 8, 40, 1, [4, 8], "float16"),  # r = 1: each image query sees only itself
    (1, 2, 16, 0, True, 5, 7, 2, [4, 8], "float32"),  # no text at all
    (1, 1, 16, 3, False, 1, 37, 4.5, [4, 8], "float32"),  # one image row
    (1, 1, 16, 4, True, 33, 1, 3, [4, 8], "float32"),  # one image column
]


def test_self_contained_kernel_matches_reference_under_the_interpreter():
    check_under_interpreter(INTERPRET_CASES, "triton-aot")


def test_the_key_loop_computes_positions_without_integer_division():
    """Compiled for sm_90 (no GPU needed): the key tiles' token positions come from each tile's corner and
    width, not from dividing token indices by the grid (a 32-bit integer division is a long instruction sequence,
    and it ran per element of every key block: 61 div.s32 in the PTX). What stays are per-program and per-tile
    scalars and the query positions, computed once."""
    import re

    from clear_surgery.plugins.triton_aot import aot_kernel, spec_for

    for tactic in (None, 0):
        ptx = aot_kernel(spec_for(128, torch.bfloat16, 16.0, True, tactic=tactic)).ptx
        divisions = len(re.findall(r"^\s*(?:div|rem)\.[su]32", ptx, re.M))
        assert divisions <= 20, (tactic, divisions)


def test_backend_refuses_raster_order_with_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the device is no reason
    q = torch.randn(1, 4 + 12, 1, 16)
    with pytest.raises(ValueError, match="triton-aot backend: .*tile token layout"):
        attention(q, q, q, text_len=4, text_first=True, height=3, width=4, radius=2, backend="triton-aot")


GPU_SHAPES = [  # (batch, heads, head_dim, text_len, text_first, grid h, grid w, radius)
    (2, 3, 64, 77, False, 37, 53, 12),
    (1, 4, 128, 512, True, 45, 29, 100),
    (1, 2, 16, 9, True, 17, 23, 1.5),
    (1, 2, 32, 0, False, 24, 16, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_self_contained_kernel_matches_reference(shape, dtype):
    b, h, d, text_len, text_first, gh, gw, r = shape
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(b, text_len + gh * gw, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    layout = TokenLayout(text_len, text_first, gh, gw, aot_tile(d))
    out = triton_aot_attention(q, k, v, layout, r, out=torch.full_like(q, float("nan")))
    ref = torch.cat([reference_attention(q[i:i + 1].double(), k[i:i + 1].double(), v[i:i + 1].double(), layout, r)
                     for i in range(b)])
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


def launch_as_tensorrt_would(q, k, v, out, grid_shape, radius, text_first, tactic=None):
    """The plugin's AOT step (kernel name, PTX, launch plan, shared memory) launched as TensorRT's AOT runtime
    launches it: the PTX JIT-compiled by the driver (cupy), at the default shared-memory limit, with exactly
    TensorRT's arguments: input tensors, the extra scalar arguments, output tensors."""
    import cupy
    import numpy as np

    from clear_surgery.plugins.tensorrt_plugin import aot_launch

    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}[q.dtype]
    tile = aot_tile(q.shape[-1])
    fields = {"radius": radius, "text_first": int(text_first), "tile_h": tile[0], "tile_w": tile[1], "scale": 0.0}
    name, ptx, plan, shared = aot_launch(tuple(q.shape), grid_shape, dtype, fields, tactic)
    assert shared <= 48 * 1024
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())  # PTX: the driver compiles it for this GPU, as TensorRT's runtime does
    function = module.get_function(name)
    carrier = torch.empty(grid_shape, device="cuda", dtype=q.dtype)
    pointers = [np.uint64(t.data_ptr()) for t in (q, k, v, carrier)]
    args = (*pointers, *(np.int32(s) for s in plan.scalars), np.uint64(out.data_ptr()))
    torch.cuda.synchronize()
    function(plan.grid, plan.block, args, shared_mem=shared)
    cupy.cuda.Device().synchronize()
    return ptx


@pytest.mark.gpu
@pytest.mark.parametrize("tactic", [1, 2, 3])
@pytest.mark.parametrize("side", [256, 512])  # 4096 and 8192 px
@pytest.mark.parametrize("text_first", [True, False])
def test_gpu_tensorrt_launch_equals_the_triton_backend(text_first, side, tactic):
    """FLUX shapes at 4096 and 8192 px, r = 16, bf16, every tactic: the engine's launch of the AOT kernel (its
    PTX, TensorRT's ten arguments) gives the PyTorch triton backend's output."""
    from clear_surgery.plugins.triton_backend import triton_clear_attention

    pytest.importorskip("cupy")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 512 + side * side, 24, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    layout = TokenLayout(512, text_first, side, side, aot_tile(128))
    want = triton_clear_attention(q, k, v, layout, 16)
    out = torch.full_like(q, float("nan"))
    launch_as_tensorrt_would(q, k, v, out, (side, side), 16.0, text_first, tactic)
    error = rel_err(out, want)
    print(f"tensorrt-launch side={side} text_first={text_first} tactic={tactic} rel_err={error:.3e}")
    assert not out.isnan().any() and error < 1e-2
