"""Band-parallel CLEAR attention on torch.distributed (gloo, CPU processes) equals single-process CLEAR."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clear_surgery.plugins import TokenLayout, reference_attention
from clear_surgery.plugins.band_parallel import BandPlan, BandPlanError, band_parallel_attention

# (batch, heads, head_dim, text_len, text_first, height, width, radius)
CASES = [
    (2, 2, 16, 5, True, 11, 7, 2.5),  # non-square, batch 2
    (1, 3, 16, 9, False, 9, 13, 3),  # text last
    (1, 2, 16, 4, True, 12, 5, 1),  # r = 1: no halo at all
    (2, 1, 32, 3, False, 13, 6, 4.2),  # halo of 4 rows, bands of 4-7 rows
]


def _inputs(case, seed=0):
    b, h, d, text_len, text_first, gh, gw, r = case
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, text_len + gh * gw, h, d, generator=g) for _ in range(3)]


def _rank_part(t, case, plan, rank):
    """The text tokens and ``rank``'s band of image rows, as that rank holds them."""
    _, _, _, text_len, text_first, *_ = case
    band = plan.tokens(rank)
    if text_first:
        return torch.cat([t[:, :text_len], t[:, text_len + band.start:text_len + band.stop]], 1)
    return torch.cat([t[:, band], t[:, t.shape[1] - text_len:]], 1)


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, case in enumerate(CASES):
            b, h, d, text_len, text_first, gh, gw, r = case
            q, k, v = _inputs(case, seed=i)
            plan = BandPlan.split(gh, gw, r, world)
            out = band_parallel_attention(*(_rank_part(t, case, plan, rank) for t in (q, k, v)), text_len=text_len,
                                          text_first=text_first, plan=plan, radius=r, backend="reference")
            results[(rank, i)] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_band_parallel_equals_one_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        for i, case in enumerate(CASES):
            b, h, d, text_len, text_first, gh, gw, r = case
            q, k, v = _inputs(case, seed=i)
            whole = reference_attention(q, k, v, TokenLayout(text_len, text_first, gh, gw), r)
            plan = BandPlan.split(gh, gw, r, world)
            for rank in range(world):
                torch.testing.assert_close(results[(rank, i)], _rank_part(whole, case, plan, rank), atol=1e-5,
                                           rtol=1e-5, msg=f"case {i}, rank {rank} of {world}")


def test_plan_splits_rows_and_refuses_thin_bands():
    plan = BandPlan.split(13, 6, 4.2, 3)
    assert [plan.rows(r) for r in range(3)] == [(0, 5), (5, 9), (9, 13)] and plan.halo == 4
    assert BandPlan.split(12, 5, 1, 4).halo == 0
    with pytest.raises(BandPlanError, match="thinner than the 4 rows"):
        BandPlan.split(13, 6, 4.2, 4)  # bands of 3-4 rows need keys from two bands away
    assert math.ceil(4.2) - 1 == 4
