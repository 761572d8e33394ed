import json

import pytest
import torch

from clear_surgery.plugins import TokenLayout, dense_mask
from clear_surgery.surgery.tools import bench
from clear_surgery.surgery.cli import app
from typer.testing import CliRunner


@pytest.mark.parametrize("h,w,r", [(7, 9, 1), (7, 9, 2), (12, 5, 3.5), (16, 16, 8), (4, 6, 50)])
def test_needed_flops_count_exactly_the_visible_pairs(h, w, r):
    text, heads, head_dim = 5, 3, 16
    pairs = dense_mask(TokenLayout(text, True, h, w), r).sum().item()
    assert bench.needed_flops(text, h, w, r, heads, head_dim) == 4.0 * pairs * heads * head_dim


@pytest.mark.parametrize("side,r,th,tw", [(20, 3.0, 4, 4), (19, 5.0, 8, 8), (13, 2.5, 2, 8), (6, 40.0, 4, 4)])
def test_window_union_per_query_is_exact(side, r, th, tw):
    """Brute force: for every tile, the keys any of its queries sees, counted once per query."""
    mask = dense_mask(TokenLayout(0, True, side, side), r)  # raster order: token = y * side + x
    y, x = torch.arange(side * side) // side, torch.arange(side * side) % side
    total = 0
    for ty in range(0, side, th):
        for tx in range(0, side, tw):
            queries = (y >= ty) & (y < ty + th) & (x >= tx) & (x < tx + tw)
            total += int(mask[queries].any(0).sum()) * int(queries.sum())
    assert bench.window_union_per_query(side, r, th, tw) == pytest.approx(total / side**2, rel=1e-12)


def test_attention_bench_rows_on_cpu():
    rows = bench.bench_attention([128], [2.0, 4.0], ["dense-math", "flex-raster", "flex-tiled"], heads=2, head_dim=16,
                                 text=8, dtype=torch.float32, device="cpu", rep=1)
    assert [r["backend"] for r in rows] == ["dense-math", "flex-raster", "flex-tiled", "flex-raster", "flex-tiled"]
    for row in rows:
        assert row["ms"] > 0 and "error" not in row
    flex_ms = {r["radius"]: r["ms"] for r in rows if r["backend"] == "flex-raster"}
    for row in rows:  # each CLEAR row against flex-raster at the same size and radius; dense rows have none
        assert ("speedup_vs_flex_raster" in row) == (row["radius"] is not None)
        if row["radius"] is not None:
            assert row["speedup_vs_flex_raster"] == flex_ms[row["radius"]] / row["ms"]
    assert rows[1]["needed_gflop"] < rows[3]["needed_gflop"]  # a larger window needs more work


def test_step_bench_on_a_tiny_flux(tmp_path):
    config = dict(bench.TINY_FLUX_DEV, in_channels=16)
    rows = bench.bench_step([128], 2, backend="reference", device="cpu", config=config)
    assert rows[0]["dense_ms"] > 0 and rows[0]["clear_ms"] > 0 and rows[0]["speedup"] > 0
    bench.plot([], rows, tmp_path / "step.png")
    assert (tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"


def test_compiled_step_bench_compiles_each_configuration(monkeypatch):
    """bench --compile-regional: the dense and the CLEAR step each timed on blocks compiled afresh (graphs
    captured for both; dynamo's caches reset between them)."""
    from torch._dynamo.utils import counters

    graphs = []
    real = bench.compiled_for_timing

    def counting(model, how):
        graphs.append(counters["stats"]["unique_graphs"])
        return real(model, how)

    monkeypatch.setattr(bench, "compiled_for_timing", counting)
    torch._dynamo.reset()
    counters.clear()
    config = dict(bench.TINY_FLUX_DEV, in_channels=16)
    rows = bench.bench_step([128], 2, backend="reference", device="cpu", config=config, compiled="regional")
    graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert rows[0]["compiled"] == "regional" and rows[0]["dense_ms"] > 0 and rows[0]["clear_ms"] > 0
    assert graphs[0] == 0 and graphs[1] > graphs[0] and graphs[2] > graphs[1]  # dense compiled, then CLEAR


def test_bench_cli_writes_json_and_png(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--sizes", "96", "--radii", "2",
                                      "--backends", "dense-math,flex-raster", "--no-step", "--device", "cpu",
                                      "--heads", "2", "--head-dim", "16", "--text", "4"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "attention.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"dense-math", "flex-raster"}
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
