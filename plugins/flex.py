"""FlexAttention backend with a BlockMask built analytically per block (never an N×N mask)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.nn.attention import flex_attention as _flex_module
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .layout import TokenLayout, classify_blocks
from .masking import key_bias
from .reference import with_extra

BLOCK = 128


def flex_reason(q, k, v, layout: TokenLayout, radius: float, scale=None) -> str | None:
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported by FlexAttention"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device.type} is not supported"
    if q.device.type == "cuda" and q.shape[-1] < 16:
        return f"head dim {q.shape[-1]} < 16 is not supported by FlexAttention's GPU kernel"
    return None


def flex_positions() -> str:
    """How the flex backend's mask_mod finds token positions: "tables" (default; a (y, x) lookup per token,
    as a plain table-lookup BlockMask does) or "arithmetic" (closed form from the index; kept to measure
    one against the other: CLEAR_FLEX_POSITIONS=arithmetic)."""
    return os.environ.get("CLEAR_FLEX_POSITIONS", "tables")


def clear_mask_mod(layout: TokenLayout, radius: float, device=None):
    """The CLEAR mask as a FlexAttention mask_mod.

    Token positions come from (y, x) tables of every key index (text and extra keys get a far-away
    sentinel and are told apart by index ranges, which compare against constants), or, with
    CLEAR_FLEX_POSITIONS=arithmetic, in closed form from the index. The layout's numbers stay Python
    ints: compiled, comparisons and divisions by constants are cheap (reading the grid sizes from a
    tensor ran 5x slower on an H200, recipes/benchmarks/h200-run2). Each layout is its own compiled
    graph; see _compiled_flex for the recompile limit.
    """
    start, count, r2 = layout.image_start, layout.image_tokens, radius * radius
    joint = layout.seq_len
    if flex_positions() == "tables":
        _, y, x = layout.positions(device)
        # past the joint sequence (extra keys, and the padding of the last 128-token block, where the
        # compiled kernel may evaluate mask_mod too): entries that are never used but always readable
        pad = -(-layout.key_len // BLOCK) * BLOCK - layout.seq_len
        ys = torch.nn.functional.pad(y, (0, pad), value=-1).to(torch.int32)
        xs = torch.nn.functional.pad(x, (0, pad), value=-1).to(torch.int32)

        def positions(i, index):
            return ys[index], xs[index]
    else:
        def positions(i, index):
            return layout.image_token_positions(i.clamp(0, count - 1))

    def is_text(index):  # one comparison with a constant (indices past the joint sequence: see mask_mod_extra)
        return index < start if layout.text_first else index >= count

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = positions(q_idx - start, q_idx)
        ky, kx = positions(kv_idx - start, kv_idx)
        dy, dx = qy - ky, qx - kx
        return is_text(q_idx) | is_text(kv_idx) | (dy * dy + dx * dx < r2)

    def mask_mod_extra(b, h, q_idx, kv_idx):  # extra keys after the joint sequence: image queries only
        qi = q_idx - start
        return torch.where(kv_idx >= joint, (qi >= 0) & (qi < count), mask_mod(b, h, q_idx, kv_idx))

    return mask_mod_extra if layout.extra_keys else mask_mod


def _to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, nk) bool -> kv_num_blocks (1, 1, nq) and kv_indices (1, 1, nq, nk), chosen blocks first."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), order[None, None].contiguous()


@functools.lru_cache(maxsize=32)
def clear_block_mask(layout: TokenLayout, radius: float, device: torch.device) -> BlockMask:
    """BlockMask for one layout; cached since every layer of a step shares it."""
    any_true, all_true = classify_blocks(layout, radius, BLOCK, BLOCK, device)
    kv_num, kv_idx = _to_indices(any_true & ~all_true)
    full_num, full_idx = _to_indices(all_true)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                    mask_mod=clear_mask_mod(layout, radius, device),
                                    seq_lengths=(layout.seq_len, layout.key_len))


def text_bias_score_mod(layout: TokenLayout, text_bias: torch.Tensor):
    """score_mod adding each sample's text bias (text padding) to the text keys' scores."""
    bias = key_bias(text_bias, layout)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return score_mod


@functools.cache
def _compiled_flex():
    # One compiled graph per sequence length (dynamic=False keeps the fast static kernels). Each new
    # resolution is a recompile, and dynamo's default limit (8) would silently fall back to the
    # unfused path after a few resolutions, so the limits are raised (process-wide).
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


@contextlib.contextmanager
def _allow_cpu_autograd():
    # torch's public wrapper refuses autograd on CPU, but its eager implementation (the unfused
    # math path) differentiates correctly; we use it on CPU only, at test sizes.
    original = _flex_module._validate_device
    _flex_module._validate_device = lambda *args: None
    try:
        yield
    finally:
        _flex_module._validate_device = original


def flex_clear_attention(q, k, v, layout: TokenLayout, radius: float, scale: float | None = None, *,
                         extra=None, text_bias=None, return_lse: bool = False):
    """Same signature and result as reference_attention."""
    k, v = with_extra(k, v, extra)
    block_mask = clear_block_mask(layout, float(radius), q.device)
    score_mod = text_bias_score_mod(layout, text_bias) if text_bias is not None else None
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cuda":
        out = _compiled_flex()(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=scale,
                               return_lse=return_lse)
    else:
        with _allow_cpu_autograd():
            out = flex_attention(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                 return_lse=return_lse)
    if return_lse:  # FlexAttention's log-sum-exp is in natural log, (batch, heads, tokens)
        out, lse = out
        return out.transpose(1, 2), lse.float().transpose(1, 2)
    return out.transpose(1, 2)
