"""FP8 backend of clear::attention (``gluon-fp8``): the ping-pong Hopper kernel with Q·Kᵀ and P·V in e4m3 for
the image queries (gluon_pingpong_kernel.py, ``FP8``), FlashAttention-3's recipe: Q, K and V quantized with
one scale per (batch, head), P quantized in registers, the output in the inputs' dtype. The text queries
(full attention over every token, a small share of the work) run on the bf16 kernel in the same buffers.

Chosen by ``auto`` only for calls that ask for FP8 attention (``fp8=True``; ``set_backend(model, ...,
fp8_attention=True)``), never silently; a call it cannot take (``gluon_fp8_reason``) goes to the bf16 backends.
Forward only: a call that needs gradients goes elsewhere (FP8 attention is an inference setting).

``fp8_emulated_attention`` is the same arithmetic in PyTorch (quantization of Q, K, V and P, float32
accumulation): the accuracy tests derive the kernel's tolerance from it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .gluon_backend import (
    BLOCK,
    PINGPONG_PROGRAM,
    clear_fwd_pingpong_kernel,
    descriptor,
    gluon_clear_attention,
    gluon_reason,
    group_lists,
    kernel_arguments,
    pingpong_reason,
    softmax_scale,
    token_descriptor,
)
from .fp8_quantize import E4M3, E4M3_MAX, quantize_heads, quantize_per_head  # noqa: F401 (the format's names)
from .layout import TokenLayout, dense_mask
from .reference import reference_attention
from .triton_backend import output_buffer

# P is quantized 2**P_SHIFT times larger (the kernel's P_SHIFT): probabilities down to 2**-14 of the row's
# running max stay normal e4m3 numbers (its smallest normal is 2**-6), instead of flushing to subnormals
P_SHIFT = 8


def gluon_fp8_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    """Why the FP8 kernel cannot run this call (None: it can): the bf16 kernel's conditions (gluon_reason), and
    pairs of image query blocks for its ping-pong programs."""
    reason = gluon_reason(q, k, v, layout, radius, scale)
    if reason:
        return reason
    if not layout.image_tokens:
        return "no image queries (the FP8 kernel computes the image rows)"
    return pingpong_reason(layout, q.shape[0] * q.shape[2], 1, BLOCK, True, None, "image")


@functools.cache
def _text_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream of ``device`` that has waited for everything enqueued so far on the current one."""
    side = _text_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return side


def gluon_fp8_clear_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                              extra=None, text_bias=None, out: torch.Tensor | None = None, return_lse: bool = False,
                              stages: int | None = None, overlap: bool = False, concurrent_text: bool = True):
    """reference_attention's signature; the image rows in FP8 arithmetic, the text rows as the bf16 kernel's.
    ``stages``: K/V buffers per warpgroup (3 to 6; default PINGPONG_PROGRAM's);
    ``overlap``: gluon_clear_attention's option, for the FP8 kernel.
    ``concurrent_text``: the text rows on a second CUDA stream, beside the quantization and the image rows. The
    text rows are few programs that each walk every key (FLUX at 4096²: 96 programs for 132 SMs, 1032 key
    blocks each): alone they leave SMs idle for their whole length, while in the bf16 kernel's single launch the
    image programs fill those SMs. On by default: on an H200 it took a FLUX layer at r16 from 5.26 to 4.80 ms at
    4096² and from 20.05 to 18.56 ms at 8192², with the same bytes out (``False``: one stream)."""
    if extra is not None or text_bias is not None:
        raise ValueError("gluon-fp8 backend: does not support pooled_keys or text_bias")
    default_stages, maxnreg = PINGPONG_PROGRAM
    stages = stages or default_stages
    # 8-bit K and V blocks of 64 keys: 6 stages of both rings fill shared memory at head dim 128; the overlap
    # variant holds three key blocks at once (P·V of j-1, V of j, Q·Kᵀ of j+1), so it would wait forever on two
    if not 3 <= stages <= 6:
        raise ValueError(f"gluon-fp8 backend: stages must be 3 to 6, got {stages}")
    reason = gluon_fp8_reason(q, k, v, layout, radius, scale)
    if reason:
        raise ValueError(f"gluon-fp8 backend: {reason}")
    batch, tokens, heads, head_dim = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = output_buffer(q, out)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device) if return_lse else out
    # the mask lists both launches read, built (once, cached) on this stream before another stream may read them
    lists = group_lists(layout.height, layout.width, layout.tile, float(radius), q.device, 1, BLOCK)
    side = side_stream(q.device) if concurrent_text and layout.text_len and q.is_cuda else None
    if layout.text_len:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            gluon_clear_attention(q, k, v, layout, radius, scale, out=out, return_lse=return_lse, queries="text",
                                  lse=lse)
    # V transposed, (batch * heads * head_dim, tokens): the 8-bit wgmma reads P·V's B operand K-major only; its
    # keys in P's register order (fp8_quantize.p_register_order)
    (q8, q_factor), (k8, k_factor) = quantize_heads(q), quantize_heads(k)
    v_t, v_factor = quantize_heads(v, transposed=True)
    descale = torch.stack([q_factor, k_factor, v_factor])  # (3, batch * heads)
    image_items = layout.image_tokens // BLOCK
    args = kernel_arguments((token_descriptor(q8, BLOCK), token_descriptor(k8, BLOCK),
                             descriptor(v_t, [head_dim, BLOCK])),
                            out, lse, layout, lists, softmax_scale(scale, head_dim), 0, image_items)
    clear_fwd_pingpong_kernel[(image_items * batch * heads // 2,)](
        *args, descale, BLOCK_N=BLOCK, HEAD_DIM=head_dim, STAGES=stages, STORE_LSE=return_lse,
        num_warps=4, maxnreg=maxnreg, FP8=True, OVERLAP=overlap)
    if side is not None:  # what comes after this call waits for the text rows too
        torch.cuda.current_stream(q.device).wait_stream(side)
    return (out, lse.transpose(1, 2)) if return_lse else out


def fp8_emulated_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None) -> torch.Tensor:
    """The FP8 kernel's arithmetic in PyTorch, in float64 apart from the roundings the kernel makes: Q, K, V to
    e4m3 per (batch, head); P to e4m3 (2**P_SHIFT larger) against the row max, the row sum taken before that
    rounding (the kernel rounds P against a running max, never above the final one: at most this coarse). The
    text rows are the reference's (float64): the kernel leaves them to the bf16 one."""
    batch, tokens, heads, head_dim = q.shape
    rounded = [quantize_per_head(t) for t in (q, k, v)]
    q8, k8, v8 = ((t.double() * f.double().view(batch, 1, heads, 1)) for t, f in rounded)
    scores = torch.einsum("bqhd,bkhd->bhqk", q8, k8) * (scale if scale is not None else head_dim ** -0.5)
    scores = scores.masked_fill(~dense_mask(layout, radius, q.device), float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True)) * 2.0 ** P_SHIFT
    row_sum = p.sum(-1).transpose(1, 2)[..., None]
    out = torch.einsum("bhqk,bkhd->bqhd", p.float().to(E4M3).double(), v8) / row_sum
    start = 0 if layout.text_first else layout.image_tokens  # the text segment's first row
    text = slice(start, start + layout.text_len)
    out[:, text] = reference_attention(q.double(), k.double(), v.double(), layout, radius, scale)[:, text]
    return out
