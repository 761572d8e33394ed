"""Pooled image tokens of the official CLEAR "down" variant (``clear_local_<r>_down_<f>``).

Every f×f block of the image grid becomes one token: the weighted sum of its keys (after RoPE) and
of its values, with one learned weight per position in the block (``spatial_weight``, the official
shape (1, 1, 1, f, 1, f, 1), initialised to 1/f²). Image queries see these H/f·W/f tokens in whole
(``extra_k`` / ``extra_v`` of the op); text queries do not.
"""

from __future__ import annotations

import torch

from .layout import TokenLayout, tile_inverse_permutation


def spatial_weight_shape(factor: int) -> tuple[int, ...]:
    return (1, 1, 1, factor, 1, factor, 1)


def check_poolable(height: int, width: int, factor: int) -> None:
    if height % factor or width % factor:
        raise ValueError(f"the 'down' variant pools {factor}x{factor} blocks of image tokens: the image grid "
                         f"{height}x{width} is not a multiple of {factor} (choose an image size whose token grid is)")


def pool_image_tokens(x: torch.Tensor, layout: TokenLayout, factor: int, weight: torch.Tensor) -> torch.Tensor:
    """x: (batch, tokens, heads, dim) of the joint sequence -> (batch, H/f·W/f, heads, dim), raster order
    of the pooled grid. Tile-ordered image tokens are put back in raster order first."""
    height, width = layout.height, layout.width
    if layout.images:
        raise ValueError("the 'down' variant pools one image: sequences of several images are not supported")
    check_poolable(height, width, factor)
    image = x[:, layout.image_start:layout.image_start + layout.image_tokens]
    if layout.tile is not None:
        image = image[:, tile_inverse_permutation(height, width, layout.tile, x.device)]
    blocks = image.unflatten(1, (height // factor, factor, width // factor, factor))  # (b, H/f, f, W/f, f, h, d)
    w = weight.reshape(factor, factor)[None, None, :, None, :, None, None].to(x.dtype)
    return (blocks * w).sum((2, 4)).flatten(1, 2)
