"""Host side of the self-contained kernel (``triton_aot_kernel.py``): the ``triton-aot`` backend of
clear::attention, and the ahead-of-time step that engines embed.

Everything a launch needs is a function of the call's shapes and of its attributes, written once here
and shared by every user: the PyTorch backend (``triton_aot_attention``), the TensorRT plugin
(plugins/tensorrt_plugin.py, whose ``aot_impl`` hands TensorRT exactly ``aot_kernel`` and
``launch_plan``) and AOTInductor (``clear::attention_aot``). ``launch_plan`` uses only ``+ - * //``
on its size arguments, so the same code builds the grid from integers or from TensorRT's symbolic
shape expressions.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .layout import TokenLayout
from .schema import aot_arguments, implements
from .schema import TENSOR_INPUTS as TENSOR_INPUTS_OF_CALL
from .triton_backend import interpreting, kernel_config, max_visible_d2, tensors_reason, triton

if triton is not None:
    from .triton_aot_kernel import clear_fwd_aot_kernel

KERNEL_NAME = "clear_fwd_aot_kernel"
# PTX ISA of the embedded kernel: what triton 3.6 writes for sm_90a; newer tritons default to newer ISAs, which
# older drivers (they JIT-compile the PTX an engine carries) and older ptxas cannot read
PTX_VERSION = 87
LOG2_E = 1.4426950408889634
# argument order of the kernel (and of a TensorRT AOT launch): input tensors, scalars, output tensors
TENSOR_INPUTS = ("Q", "K", "V", "GRID")
SCALARS = ("N", "HEADS", "BH", "GH", "GW")
TENSOR_OUTPUTS = ("O",)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class AotSpec(NamedTuple):
    """What one compiled kernel is specialized for (the attributes of a call, its dtype, a config)."""

    head_dim: int
    dtype: str  # bf16 | fp16 (fp32: the interpreter only)
    tile: tuple[int, int]
    radius: float
    text_first: bool
    scale: float | None  # None: 1 / sqrt(head_dim)
    num_warps: int = 4
    num_stages: int = 3

    @property
    def block(self) -> int:
        return self.tile[0] * self.tile[1]


class LaunchPlan(NamedTuple):
    grid: tuple  # (programs, 1, 1)
    scalars: tuple  # values of SCALARS, in order
    block: tuple  # threads per program (x, y, z)


def aot_tile(head_dim: int) -> tuple[int, int]:
    """The tile the self-contained kernel runs: one tile per program, as many tokens as the table-driven
    kernel's query block."""
    return kernel_config(head_dim).tile


def spec_for(head_dim: int, dtype: torch.dtype | str, radius: float, text_first: bool, scale=None, tile=None,
             tactic: int | None = None) -> AotSpec:
    """``tactic``: an index into TACTICS (an engine's launch); None: LAUNCH_CONFIG (Triton's and Inductor's)."""
    config = LAUNCH_CONFIG if tactic is None else TACTICS[tactic]
    return AotSpec(int(head_dim), dtype if isinstance(dtype, str) else DTYPES[dtype], tuple(tile or aot_tile(head_dim)),
                   float(radius), bool(text_first), None if scale is None else float(scale), *config)


# (num_warps, num_stages): the configs TensorRT may time as tactics, the first its default. Each fits the
# 48 KiB of dynamic shared memory a launch gets without opting in (TensorRT's AOT launch opts in to nothing
# we know of): one stage (head dim 128: 48 KiB with 4 or 8 warps, 40 KiB with 2; two stages take 80 KiB).
TACTICS = [(4, 1), (8, 1), (2, 1)]
# Launches through Triton (the triton-aot backend) and AOTInductor raise the limit themselves: three stages
# pipeline the key loads (112 KiB at head dim 128).
LAUNCH_CONFIG = (4, 3)
# Every tensor's address is a multiple of 16 bytes (PyTorch's allocations are 256-byte aligned; TensorRT's are
# assumed to be at least 16-byte aligned, as its own vectorized kernels need):
# what Triton's own launch checks and specializes on. Without it the compiled kernel loads 2 bytes at a time and
# cannot pipeline its loads (cp.async needs 16-byte rows): the same kernel ran 1.8x slower launched from its
# ahead-of-time PTX than launched by Triton (recipes/benchmarks).
ALIGNMENT = 16


def constexprs(spec: AotSpec) -> dict:
    scale = spec.scale if spec.scale is not None else spec.head_dim ** -0.5
    r2 = max_visible_d2(spec.radius)
    return dict(R2=r2, REACH=math.isqrt(r2), QK_SCALE=scale * LOG2_E, TEXT_FIRST=spec.text_first, TH=spec.tile[0],
                TW=spec.tile[1], HEAD_DIM=spec.head_dim, BLOCK_M=spec.block,
                SEGMENT_BLOCK_N=kernel_config(spec.head_dim).segment_block_n)


def launch_plan(tokens, heads, batch, height, width, spec: AotSpec) -> LaunchPlan:
    """Grid and scalar arguments from the sizes of a call (integers, or symbolic size expressions)."""
    th, tw, block = spec.tile[0], spec.tile[1], spec.block
    text = tokens - height * width
    text_blocks = (text + block - 1) // block
    tiles = ((height + th - 1) // th) * ((width + tw - 1) // tw)
    programs = (text_blocks + tiles) * (batch * heads)
    return LaunchPlan((programs, 1, 1), (tokens, heads, batch * heads, height, width), (32 * spec.num_warps, 1, 1))


def triton_aot_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    reason = tensors_reason(q, v)
    if reason is None and (layout.tile is None or math.prod(layout.tile) != math.prod(aot_tile(q.shape[-1]))):
        reason = (f"needs the tile token layout with {math.prod(aot_tile(q.shape[-1]))}-token tiles, got "
                  f"{layout.tile or 'raster order'}")
    return reason


def triton_aot_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                         out: torch.Tensor | None = None, tactic: int | None = None) -> torch.Tensor:
    """Same signature and result as reference_attention (inference forward), launched from shapes only."""
    batch, tokens, heads, head_dim = q.shape
    spec = spec_for(head_dim, q.dtype if q.dtype in DTYPES else "bf16", radius, layout.text_first, scale, layout.tile,
                    tactic)
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q) if out is None else out
    grid_carrier = q.new_empty(0)  # the kernel never reads it; an engine passes a tensor shaped (H, W)
    plan = launch_plan(tokens, heads, batch, layout.height, layout.width, spec)
    clear_fwd_aot_kernel[plan.grid](q, k, v, grid_carrier, *plan.scalars, out, **constexprs(spec),
                                    UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16,
                                    num_warps=spec.num_warps, num_stages=spec.num_stages)
    return out


if triton is not None:
    from torch.library import triton_op, wrap_triton

    @triton_op("clear::attention_aot", mutates_args=())
    @implements(aot_arguments())
    def attention_aot(*args) -> torch.Tensor:
        """clear::attention on the self-contained kernel, as a ``triton_op`` taking ``schema.engine_arguments``:
        torch.export records the kernel launch itself, so AOTInductor compiles the kernel into its package."""
        call = dict(zip((a.name for a in aot_arguments()), args))
        q, k, v = (call[name].contiguous() for name in TENSOR_INPUTS_OF_CALL)
        batch, tokens, heads, head_dim = q.shape
        spec = spec_for(head_dim, q.dtype, call["radius"], bool(call["text_first"]), call["scale"] or None,
                        (call["tile_h"], call["tile_w"]))
        out = torch.empty_like(q)
        plan = launch_plan(tokens, heads, batch, call["height"], call["width"], spec)
        wrap_triton(clear_fwd_aot_kernel)[plan.grid](q, k, v, q, *plan.scalars, out, **constexprs(spec),
                                                     UPCAST_DOT=False, num_warps=spec.num_warps,
                                                     num_stages=spec.num_stages)
        return out


class CompiledKernel(NamedTuple):
    name: str  # entry point in the PTX / cubin
    ptx: str
    cubin: bytes
    parameters: tuple[str, ...]  # PTX types of the kernel parameters in launch order (Triton appends two
    # scratch pointers after ours; with no scratch memory, as here, the kernel never reads them)
    shared_memory: int  # bytes of dynamic shared memory a launch needs
    scratch_bytes: int  # global + profile scratch memory the kernel needs (0: the scratch pointers are unused)
    num_warps: int
    target: str


@functools.lru_cache(maxsize=64)
def aot_kernel(spec: AotSpec, arch: int = 90) -> CompiledKernel:
    """The kernel compiled for ``sm_<arch>`` without a GPU (an explicit target): what a TensorRT AOT plugin
    embeds. Cached per spec."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {"bf16": "bf16", "fp16": "fp16"}[spec.dtype]
    signature = {**{name: f"*{element}" for name in TENSOR_INPUTS}, **{name: "i32" for name in SCALARS},
                 **{name: f"*{element}" for name in TENSOR_OUTPUTS}}
    constants = dict(constexprs(spec), UPCAST_DOT=False)
    signature.update({name: "constexpr" for name in constants})
    pointers = [i for i, name in enumerate((*TENSOR_INPUTS, *SCALARS, *TENSOR_OUTPUTS)) if name not in SCALARS]
    aligned = {(i,): [["tt.divisibility", ALIGNMENT]] for i in pointers}
    source = ASTSource(fn=clear_fwd_aot_kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       "ptx_version": PTX_VERSION})
    name = compiled.metadata.name
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    scratch = getattr(meta, "global_scratch_size", 0) + getattr(meta, "profile_scratch_size", 0)
    return CompiledKernel(name, ptx, compiled.asm["cubin"], ptx_parameters(ptx, name), meta.shared, scratch,
                          spec.num_warps, f"sm_{arch}")


def engine_ptx(kernel: CompiledKernel) -> str:
    """The kernel's PTX with exactly the parameters TensorRT's AOT launcher passes (input tensors, scalars,
    output tensors): Triton appends two scratch pointers to every kernel, which this one never reads (no
    scratch memory; each is named only in the entry's parameter list), so they are dropped from it."""
    import re

    count = len(TENSOR_INPUTS) + len(SCALARS) + len(TENSOR_OUTPUTS)
    header = re.search(rf"(\.entry {re.escape(kernel.name)}\s*\()(.*?)(\))", kernel.ptx, re.S)
    params = [p.strip() for p in header.group(2).split(",")]
    extra = [p.split()[-1] for p in params[count:]]
    if kernel.scratch_bytes or any(kernel.ptx.count(name) != 1 for name in extra):
        raise RuntimeError(f"{kernel.name}: the parameters Triton added ({extra}) are used by the kernel "
                           f"(scratch memory {kernel.scratch_bytes} bytes): TensorRT's AOT launch cannot pass them")
    kept = ",\n\t".join(params[:count])
    return kernel.ptx[:header.start(2)] + "\n\t" + kept + "\n" + kernel.ptx[header.end(2):]


def ptx_parameters(ptx: str, entry: str) -> tuple[str, ...]:
    """The PTX types of the parameters of ``entry`` (.u64: a pointer, .u32: a 32-bit scalar), in order."""
    import re

    header = re.search(rf"\.entry {re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if header is None:
        raise ValueError(f"no entry {entry} in the PTX")
    return tuple(re.findall(r"\.param\s+(\.\w+)", header.group(1)))
