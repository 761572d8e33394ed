import itertools

import pytest
import torch

from clear_surgery.plugins import TokenLayout, classify_blocks, dense_mask, validate_call
from clear_surgery.plugins.layout import image_positions, tile_inverse_permutation, tile_permutation


def brute_force_mask(text_len, text_first, h, w, r):
    n = text_len + h * w
    start = text_len if text_first else 0
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi, kj = i - start, j - start
            q_img, k_img = 0 <= qi < h * w, 0 <= kj < h * w
            if not q_img or not k_img:
                mask[i, j] = True
            else:
                dy, dx = qi // w - kj // w, qi % w - kj % w
                mask[i, j] = dy * dy + dx * dx < r * r
    return mask


@pytest.mark.parametrize("text_len,text_first,h,w,r", [
    (3, True, 4, 5, 1), (3, False, 4, 5, 2), (0, True, 3, 7, 2.5), (5, False, 1, 9, 3), (2, True, 6, 2, 100),
])
def test_dense_mask_matches_definition(text_len, text_first, h, w, r):
    assert torch.equal(dense_mask(TokenLayout(text_len, text_first, h, w), r), brute_force_mask(text_len, text_first, h, w, r))


def test_radius_is_strict():
    mask = dense_mask(TokenLayout(0, True, 1, 5), 2)
    assert mask[0, 1] and not mask[0, 2]  # distance 2 is not < 2


@pytest.mark.parametrize("h,w,tile", [(16, 32, (8, 16)), (13, 29, (8, 16)), (5, 7, (8, 16)), (9, 20, (4, 6))])
def test_tile_order_is_a_permutation_with_compact_tiles(h, w, tile):
    perm = tile_permutation(h, w, tile)
    assert sorted(perm.tolist()) == list(range(h * w))
    y, x = image_positions(torch.arange(h * w), h, w, tile)
    assert torch.equal(y * w + x, perm)
    raster = torch.randn(h * w, 3)
    assert torch.equal(raster[perm][torch.argsort(perm)], raster)  # round trip is exact
    # the closed-form inverse (it traces with symbolic sizes) is argsort's
    assert torch.equal(tile_inverse_permutation(h, w, tile), torch.argsort(perm))
    # every full tile of th*tw consecutive tokens is one th x tw rectangle
    th, tw = tile
    full_bands, full_chunks = h // th, w // tw
    for band in range(full_bands):
        for chunk in range(full_chunks):
            start = band * th * w + chunk * th * tw
            ys, xs = y[start:start + th * tw], x[start:start + th * tw]
            assert ys.max() - ys.min() == th - 1 and xs.max() - xs.min() == tw - 1


def test_tile_order_mask_is_the_raster_mask_permuted():
    h, w, tile, r = 11, 21, (4, 8), 3.5
    perm = tile_permutation(h, w, tile)
    order = torch.cat([torch.arange(5), 5 + perm])  # text first
    raster = dense_mask(TokenLayout(5, True, h, w), r)
    tiled = dense_mask(TokenLayout(5, True, h, w, tile), r)
    assert torch.equal(tiled, raster[order][:, order])


@pytest.mark.parametrize("text_len,text_first,h,w,r,qb,kb", [
    (7, True, 13, 11, 3, 16, 16), (7, False, 13, 11, 5, 16, 32), (40, True, 9, 17, 2, 32, 16),
    (3, False, 20, 20, 30, 64, 64), (0, True, 10, 12, 1, 8, 8), (130, False, 7, 31, 4.5, 16, 16),
])
@pytest.mark.parametrize("tile", [None, (4, 8)])
def test_block_classes_are_exact_or_conservative(text_len, text_first, h, w, r, qb, kb, tile):
    layout = TokenLayout(text_len, text_first, h, w, tile)
    mask = dense_mask(layout, r)
    any_true, all_true = classify_blocks(layout, r, qb, kb)
    for i, j in itertools.product(range(any_true.shape[0]), range(any_true.shape[1])):
        tile = mask[i * qb:(i + 1) * qb, j * kb:(j + 1) * kb]
        assert bool(any_true[i, j]) or not tile.any(), (i, j)  # skipped blocks hold nothing
        assert not all_true[i, j] or tile.all(), (i, j)  # mask-free blocks hold only visible pairs
    # and the structure is useful: some blocks skipped or full when the window is small
    if r < min(h, w) / 2:
        assert (~any_true).any()


def test_validate_call_names_the_problem():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="image grid 2x3 = 6 tokens does not match"):
        validate_call(q, q, q, TokenLayout(3, True, 2, 3), 2.0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        validate_call(q, q, q, TokenLayout(4, True, 2, 3), 0)
