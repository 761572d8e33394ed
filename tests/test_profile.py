import json
import math

import torch
from typer.testing import CliRunner

from clear_surgery.plugins import TokenLayout
from clear_surgery.surgery.tools.bench import window_pairs
from clear_surgery.surgery.cli import app
from clear_surgery.surgery.tools.profile import LocalityProfiler

RADII = [1, 1.5, 2, 3, 10]


def test_uniform_attention_gives_the_window_fractions():
    layout = TokenLayout(6, True, 5, 7)
    n, image = layout.seq_len, layout.image_tokens
    q = torch.zeros(1, n, 2, 8)  # all scores equal: uniform attention
    k = torch.randn(1, n, 2, 8)
    profiler = LocalityProfiler(RADII, queries_per_call=image)  # every image query
    profiler.observe("layer", q, k, layout)
    res = profiler.results()
    for head in range(2):
        assert math.isclose(res["text_share"]["layer"][head], 6 / n, rel_tol=1e-6)
        for i, r in enumerate(RADII):
            expected = window_pairs(5, 7, r) / (image * n)
            assert math.isclose(res["window_share"]["layer"][head][i], expected, rel_tol=1e-6)


def test_exactly_local_attention_is_all_inside_the_window():
    layout = TokenLayout(4, False, 6, 5)  # image first
    is_image, y, x = layout.positions()
    y, x = y.float(), x.float()
    lam, dim = 60.0, 8
    # q.k = -lam * d^2 between image tokens, and -1e4 towards text keys
    q = torch.zeros(1, layout.seq_len, 1, dim)
    k = torch.zeros(1, layout.seq_len, 1, dim)
    q[0, :, 0, :5] = torch.stack([-lam * (y**2 + x**2), 2 * lam * y, 2 * lam * x, -lam * torch.ones_like(y),
                                  torch.ones_like(y)], -1) * math.sqrt(dim)
    k[0, :, 0, :4] = torch.stack([torch.ones_like(y), y, x, y**2 + x**2], -1)
    k[0, ~is_image, 0, :] = 0
    k[0, ~is_image, 0, 4] = -1e4
    profiler = LocalityProfiler(RADII, queries_per_call=layout.image_tokens)
    profiler.observe("layer", q, k, layout)
    res = profiler.results(keep=0.99)
    assert res["text_share"]["layer"][0] < 1e-6
    assert all(share > 0.999 for share in res["window_share"]["layer"][0])
    assert res["recommended_radius"] == 1


def test_recommendation_is_the_smallest_radius_keeping_the_share():
    layout = TokenLayout(0, True, 8, 8)
    profiler = LocalityProfiler(RADII, queries_per_call=64)
    profiler.observe("a", torch.zeros(1, 64, 1, 4), torch.randn(1, 64, 1, 4), layout)
    res = profiler.results(keep=0.5)
    kept = res["kept_share_mean"]
    assert kept == sorted(kept)
    first = next(r for r, share in zip(RADII, kept) if share >= 0.5)
    assert res["recommended_radius"] == first and res["recommended_radius_per_layer"]["a"] == first


def test_profile_cli_on_tiny_flux(tmp_path):
    out = tmp_path / "locality"
    result = CliRunner().invoke(app, ["profile", "--model", "builtin:tiny-flux", "--resolution", "64", "--steps", "2",
                                      "--radii", "1,2,4,8", "--queries", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "locality.json").read_text())
    assert len(res["window_share"]) == 4  # 2 double + 2 single blocks
    assert all(len(heads) == 2 and len(heads[0]) == 4 for heads in res["window_share"].values())
    assert all(0 <= t <= 1 for heads in res["text_share"].values() for t in heads)
    assert "recommended radius" in result.output
    for png in ("locality_heatmap.png", "attention_maps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
