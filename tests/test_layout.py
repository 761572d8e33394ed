import itertools

import pytest
import torch

from clear_surgery.plugins import TokenLayout, classify_blocks, dense_mask, validate_call


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


@pytest.mark.parametrize("text_len,text_first,h,w,r,qb,kb", [
    (7, True, 13, 11, 3, 16, 16), (7, False, 13, 11, 5, 16, 32), (40, True, 9, 17, 2, 32, 16),
    (3, False, 20, 20, 30, 64, 64), (0, True, 10, 12, 1, 8, 8), (130, False, 7, 31, 4.5, 16, 16),
])
def test_block_classes_are_exact_or_conservative(text_len, text_first, h, w, r, qb, kb):
    layout = TokenLayout(text_len, text_first, h, w)
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
        validate_call(q, q, q, 3, 2, 3, 2.0)
    with pytest.raises(ValueError, match="radius must be > 0"):
        validate_call(q, q, q, 4, 2, 3, 0)
