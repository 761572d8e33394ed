"""Text padding masks: the attention masks of MMDiTs whose prompts are padded (Chroma, QwenImage,
HunyuanImage, Ernie-Image), read into what CLEAR can express.

A model passes its mask as scaled_dot_product_attention takes one: bool (True: attend) or float
(added to the scores), broadcastable to (batch, heads, queries, keys). CLEAR takes:
- a key mask, (batch, 1, 1, keys): one bias per key, the same for every query (QwenImage,
  HunyuanImage and Ernie-Image hide their padded text keys with it);
- a (queries x keys) mask whose image-query rows are all one such key row; a text query's row may be
  anything, as text queries keep full attention: that row too (the kernels run it), bool all-False
  (zero output, as SDPA gives for a fully masked row), or any other row (the query attends over every
  key under its own row of the mask, outside the kernels: text queries are few). Chroma's
  ``valid[q] * valid[k]`` is one: with ChromaPipeline's float 0/1 mask it adds 1 to the scores of
  valid pairs, so padded keys are down-weighted by e, not hidden, and padded queries attend without
  bias (a constant row); a bool mask hides them. Ideogram 4's block-diagonal mask over a packed batch
  is another: its padding tokens attend among themselves.
The key row must be constant over the image tokens (softmax ignores a constant added to a row), so
what CLEAR keeps is a bias over the text keys: 0 for an unmasked key, -inf for a hidden one, and the
mask's own value otherwise. The mask must not depend on the head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import TokenLayout

VALID, ZEROED, OWN_ROW = 0, 1, 2  # what happens to a query row (OWN_ROW: text queries, under their own mask row)


class MaskError(ValueError):
    pass


class TextPadding(NamedTuple):
    text_bias: torch.Tensor | None  # (batch, text_len) float32, added to the text keys' scores; None: all zero
    query_rule: torch.Tensor | None  # (batch, tokens) int8: VALID, ZEROED or OWN_ROW; None: all VALID


def _as_bias(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    if not mask.is_floating_point():
        raise MaskError(f"attention mask dtype {mask.dtype}: bool or float masks only")
    return mask.float()


def text_padding(attn_mask: torch.Tensor, layout: TokenLayout, batch: int) -> TextPadding:
    """What a model's attention mask does, as CLEAR takes it (see the module's text); both fields None when
    it changes nothing. A mask CLEAR cannot express raises MaskError naming what it does."""
    n = layout.seq_len
    if attn_mask.dim() > 4 or attn_mask.shape[-1] != n:
        raise MaskError(f"attention mask of shape {tuple(attn_mask.shape)} does not end in the {n} keys")
    bias = _as_bias(attn_mask)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if bias.shape[0] not in (1, batch) or bias.shape[2] not in (1, n):
        raise MaskError(f"attention mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch {batch}, "
                        f"heads, {n}, {n})")
    if bias.shape[1] != 1 and not torch.equal(bias, bias[:, :1].expand_as(bias)):
        raise MaskError("the attention mask differs between heads: CLEAR takes one mask for all heads")
    bias = bias[:, 0].expand(batch, -1, -1)
    image = slice(layout.image_start, layout.image_start + layout.image_tokens)
    text = slice(0, layout.text_len) if layout.text_first else slice(layout.image_tokens, n)
    rows = bias[:, image.start] if bias.shape[1] > 1 else bias[:, 0]  # (batch, keys): what image queries see
    rule = None
    if bias.shape[1] > 1:  # a (queries x keys) mask
        if not torch.equal(bias[:, image], rows[:, None, :].expand(-1, layout.image_tokens, -1)):
            raise MaskError("image queries see different keys under the attention mask: CLEAR takes a padding mask")
        text_rows = bias[:, text]
        valid = (text_rows == rows[:, None, :]).all(-1)
        constant = (text_rows == text_rows[:, :, :1]).all(-1)
        hidden = constant & torch.isinf(text_rows[:, :, 0]) & (text_rows[:, :, 0] < 0)
        rule = torch.full((batch, n), VALID, dtype=torch.int8, device=bias.device)
        rule[:, text] = torch.where(valid, VALID, torch.where(hidden, ZEROED, OWN_ROW)).to(torch.int8)
        rule = None if bool((rule == VALID).all()) else rule
    shift = rows[:, image]
    if not torch.equal(shift, shift[:, :1].expand_as(shift)) or not bool(torch.isfinite(shift).all()):
        raise MaskError("the attention mask hides or weighs image tokens: CLEAR takes masks over the text tokens only")
    text_bias = (rows[:, text] - shift[:, :1]).contiguous()
    if bool((text_bias == 0).all()):
        text_bias = None
    return TextPadding(text_bias, rule)


def key_bias(text_bias: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(batch, key_len) float32 over every key (extra keys included): the text bias, 0 elsewhere."""
    bias = torch.zeros(text_bias.shape[0], layout.key_len, dtype=torch.float32, device=text_bias.device)
    start = 0 if layout.text_first else layout.image_tokens
    bias[:, start:start + layout.text_len] = text_bias
    return bias
