"""Token geometry of a joint text+image sequence, shared by every backend.

The joint sequence is a text segment of ``text_len`` tokens and an image segment of
``height * width`` tokens, text first or last. In raster order image token ``i`` sits at
``y = i // width, x = i % width``; in tile order (``tile=(th, tw)``) the grid is cut into bands of
``th`` rows and each band into chunks of ``tw`` columns (edge bands/chunks are smaller), chunks
follow each other band by band and tokens are in raster order inside a chunk. A text query sees every key; an image query sees every
text key and the image keys with ``(dy² + dx²) < radius²`` (strict, truncated at borders).

``extra_keys``: a segment of keys (and values) after the joint sequence that image queries see in
whole and text queries do not see at all; the official "down" variant's pooled image keys.

``images``: more images after the first, each a grid of its own ((rows, cols), raster order), their
tokens following the first image's (FLUX.1 Kontext's reference images). Every image's token (y, x)
counts from its own top-left corner, and an image query sees the image keys of every image within
its radius in those coordinates: its own window, and the window at the same place in the others
(the grids laid on top of each other). Raster order only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    text_len: int
    text_first: bool
    height: int
    width: int
    tile: tuple[int, int] | None = None  # None: raster order
    extra_keys: int = 0  # keys after the joint sequence visible to image queries only
    images: tuple[tuple[int, int], ...] = ()  # further images' grids, after the first

    @property
    def key_len(self) -> int:
        return self.seq_len + self.extra_keys

    @property
    def image_tokens(self) -> int:
        return self.height * self.width + sum(h * w for h, w in self.images)

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        return ((self.height, self.width), *self.images)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_tokens

    @property
    def image_start(self) -> int:
        return self.text_len if self.text_first else 0

    def positions(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token: is_image, y, x (y = x = -1 for text tokens)."""
        idx = torch.arange(self.seq_len, device=device) - self.image_start
        is_image = (idx >= 0) & (idx < self.image_tokens)
        y, x = self.image_token_positions(idx.clamp(0, self.image_tokens - 1))
        return is_image, torch.where(is_image, y, -1), torch.where(is_image, x, -1)

    def image_token_positions(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, x) of image tokens with indices ``i`` (0 = the first image's first token), each image's in its
        own grid."""
        y, x = image_positions(i, self.height, self.width, self.tile)
        start = self.height * self.width
        for height, width in self.images:  # raster order (the tile layout takes one image)
            local = i - start
            y, x = torch.where(local >= 0, local // width, y), torch.where(local >= 0, local % width, x)
            start += height * width
        return y, x


def image_positions(i: torch.Tensor, height: int, width: int, tile: tuple[int, int] | None):
    """(y, x) of image tokens with indices ``i`` in raster or tile order (same arithmetic as the kernel)."""
    if tile is None:
        return i // width, i % width
    th, tw = tile
    band = i // (th * width)
    band_h = torch.clamp(height - band * th, max=th)
    j = i - band * th * width
    chunk = j // (band_h * tw)
    chunk_w = torch.clamp(width - chunk * tw, max=tw)
    k = j - chunk * band_h * tw
    return band * th + k // chunk_w, chunk * tw + k % chunk_w


def tile_permutation(height: int, width: int, tile: tuple[int, int], device=None) -> torch.Tensor:
    """perm such that tiled_tokens = raster_tokens[perm] (and raster = tiled[argsort(perm)])."""
    y, x = image_positions(torch.arange(height * width, device=device), height, width, tile)
    return y * width + x


def tile_inverse_permutation(height: int, width: int, tile: tuple[int, int], device=None) -> torch.Tensor:
    """inverse such that raster_tokens = tiled_tokens[inverse]: the tile-order index of each raster token,
    in closed form (no argsort), so that it traces with symbolic sizes."""
    th, tw = tile
    j = torch.arange(height * width, device=device)
    y = j // width
    x = j - y * width  # not j % width: the ONNX exporter cannot take a remainder by a symbolic size
    band = y // th
    band_h = torch.clamp(height - band * th, max=th)
    chunk = x // tw
    chunk_w = torch.clamp(width - chunk * tw, max=tw)
    return band * th * width + chunk * band_h * tw + (y - band * th) * chunk_w + (x - chunk * tw)


def validate_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, radius: float,
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One clear error for a malformed call; shared by the op and every backend's can_run.
    ``extra``: the extra keys and values, checked when given (the backends' can_run see only their count,
    ``layout.extra_keys``; the op's front door checks the tensors)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, tokens, heads, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must agree on (batch, tokens, heads); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    text_len = layout.text_len
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if layout.tile is not None and min(layout.tile) < 1:
        raise ValueError(f"bad tile shape {layout.tile}")
    if min(min(g) for g in layout.grids) < 1 or text_len < 0:
        raise ValueError(f"bad image grid {' + '.join(f'{h}x{w}' for h, w in layout.grids)} or text length {text_len}")
    if layout.images and layout.tile is not None:
        raise ValueError("the tile token layout takes one image; sequences of several images run in raster order")
    tokens = q.shape[1]
    if text_len + layout.image_tokens != tokens:
        grids = " + ".join(f"{h}x{w}" for h, w in layout.grids)
        raise ValueError(
            f"image grid {grids} = {layout.image_tokens} tokens does not match the sequence: "
            f"{tokens} tokens with {text_len} text tokens leaves {tokens - text_len} image tokens")
    if layout.extra_keys < 0:
        raise ValueError(f"extra_keys must be >= 0, got {layout.extra_keys}")
    if extra is not None:
        ek, ev = extra
        if ek.dim() != 4 or ev.dim() != 4 or ek.shape[:3] != ev.shape[:3] or ek.shape[1] != layout.extra_keys:
            raise ValueError(f"extra keys and values must be (batch, {layout.extra_keys}, heads, head_dim) alike; got "
                             f"{tuple(ek.shape)}, {tuple(ev.shape)}")
        if ek.shape[0] != k.shape[0] or ek.shape[2] != k.shape[2] or ek.shape[3] != k.shape[3] \
                or ev.shape[3] != v.shape[3] or ek.dtype != k.dtype or ev.dtype != v.dtype or ek.device != k.device:
            raise ValueError(f"extra keys {tuple(ek.shape)} {ek.dtype} and values {tuple(ev.shape)} {ev.dtype} must match "
                             f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} in batch, heads, head dim, "
                             "dtype and device")


def dense_mask(layout: TokenLayout, radius: float, device=None) -> torch.Tensor:
    """The exact (N, N + extra_keys) boolean mask. O(N²): for the reference backend and tests only."""
    is_image, y, x = layout.positions(device)
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    mask = ~is_image[:, None] | ~is_image[None, :] | (d2 < radius * radius)
    return torch.cat([mask, is_image[:, None].expand(-1, layout.extra_keys)], 1) if layout.extra_keys else mask


def block_boxes(layout: TokenLayout, block: int, device=None, keys: bool = False):
    """Per block of ``block`` consecutive tokens (queries, or with ``keys`` the keys, extra keys
    included): has_text, has_image, has_extra and the bounding box (ymin, ymax, xmin, xmax) of its
    image tokens. O(N)."""
    is_image, y, x = layout.positions(device)
    extra = layout.extra_keys if keys else 0
    n = layout.seq_len + extra
    nb = -(-n // block)

    def padded(t, fill, size=n):
        return torch.nn.functional.pad(t, (0, nb * block - size), value=fill).view(nb, block)

    img = padded(is_image, False, layout.seq_len)
    real = padded(torch.ones(layout.seq_len, dtype=torch.bool, device=device), False, layout.seq_len)
    ext = padded(torch.arange(n, device=device) >= layout.seq_len, False)
    txt = real & ~img
    big = 1 << 30  # sentinel for blocks without image tokens; its square still fits int64

    def lo(t):
        return torch.where(img, padded(t, 0, layout.seq_len), big).amin(1)

    def hi(t):
        return torch.where(img, padded(t, 0, layout.seq_len), -big).amax(1)

    return txt.any(1), img.any(1), ext.any(1), lo(y), hi(y), lo(x), hi(x)


def classify_blocks(layout: TokenLayout, radius: float, q_block: int, kv_block: int, device=None):
    """Block-level structure of the CLEAR mask without an N×N mask.

    Returns (any_true, all_true), both (num_q_blocks, num_kv_blocks) bool: a block pair is
    skipped when nothing in it is visible and computed without a mask when everything is.
    Bounding boxes make both tests conservative: a pair that is neither goes through the mask.
    """
    q_txt, q_img, _, qy0, qy1, qx0, qx1 = block_boxes(layout, q_block, device)
    k_txt, k_img, k_ext, ky0, ky1, kx0, kx1 = block_boxes(layout, kv_block, device, keys=True)
    r2 = radius * radius

    def gap(a0, a1, b0, b1):  # smallest |a - b| between the intervals [a0, a1] and [b0, b1]
        return torch.clamp(torch.maximum(b0[None, :] - a1[:, None], a0[:, None] - b1[None, :]), min=0)

    def span(a0, a1, b0, b1):  # largest |a - b|
        return torch.maximum(b1[None, :] - a0[:, None], a1[:, None] - b0[None, :])

    near = gap(qy0, qy1, ky0, ky1) ** 2 + gap(qx0, qx1, kx0, kx1) ** 2 < r2
    far = span(qy0, qy1, ky0, ky1) ** 2 + span(qx0, qx1, kx0, kx1) ** 2 >= r2
    img_pair = q_img[:, None] & k_img[None, :]
    any_true = k_txt[None, :] | (q_txt[:, None] & k_img[None, :]) | (img_pair & near) | (q_img[:, None] & k_ext[None, :])
    all_true = ~(img_pair & far) & ~(q_txt[:, None] & k_ext[None, :])
    return any_true, all_true & any_true


def with_text_queries(q: torch.Tensor, text_len: int, text_first: bool) -> tuple[torch.Tensor, slice]:
    """The image's queries alone (an image-query-only call) as a whole sequence: the text rows filled with
    zeros where the layout puts them; and the rows of the image queries in it."""
    zeros = q.new_zeros((q.shape[0], text_len, *q.shape[2:]))
    if text_first:
        return torch.cat([zeros, q], 1), slice(text_len, None)
    return torch.cat([q, zeros], 1), slice(0, q.shape[1])
