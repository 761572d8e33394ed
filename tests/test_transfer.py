"""check-transfer: its metrics on known cases, and whole runs on the committed testbed (2 images)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from clear_surgery.surgery import get_clear_state
from clear_surgery.surgery.cli import main
from clear_surgery.surgery.tools import image_metrics as m

TESTBED = Path(__file__).parents[1] / "recipes" / "testbed"
MODELS = TESTBED / "models"


def _images(seed=0, n=2, h=24, w=20):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_identical_images_have_infinite_psnr_and_ssim_one():
    a = _images()
    assert m.psnr(a, a.clone()) == [math.inf, math.inf]
    assert m.ssim(a, a.clone()) == pytest.approx([1.0, 1.0], abs=1e-12)


def test_known_perturbation_has_its_known_psnr():
    a = _images().double() * 0.8  # float64: the offsets below are exact enough for 1e-6 dB
    for delta, expected in ((0.1, 20.0), (0.01, 40.0), (1 / 255, 20 * math.log10(255))):
        assert m.psnr(a, a + delta) == pytest.approx([expected] * 2, abs=1e-6)
    # one image changed, the other not: per-image values
    b = a.clone()
    b[1] += 0.1
    assert m.psnr(a, b)[0] == math.inf and m.psnr(a, b)[1] == pytest.approx(20.0, abs=1e-6)


def test_ssim_known_values():
    a = _images(h=32, w=32)
    # a constant offset leaves structure and contrast, only the luminance term moves:
    # l = (2 mu (mu + d) + C1) / (mu^2 + (mu + d)^2 + C1) averaged over windows; close to 1, below it
    shifted = m.ssim(a, a + 0.05)
    assert all(0.95 < s < 1 for s in shifted)
    # uncorrelated noise images: SSIM near 0; the inverted image (same means, correlation -1): near -1
    assert all(abs(s) < 0.1 for s in m.ssim(a, _images(seed=1, h=32, w=32)))
    assert all(s < -0.9 for s in m.ssim(a, 1 - a))
    # the full formula by hand on one 11x11 window (an image of exactly the window size)
    x, y = _images(seed=2, n=1, h=11, w=11), _images(seed=3, n=1, h=11, w=11)
    g = m._gaussian_window(11)
    w2 = (g[:, None] * g[None, :]).double()
    values = []
    for c in range(3):
        xc, yc = x[0, c].double(), y[0, c].double()
        mx, my = (w2 * xc).sum(), (w2 * yc).sum()
        vx, vy = (w2 * xc * xc).sum() - mx ** 2, (w2 * yc * yc).sum() - my ** 2
        cov = (w2 * xc * yc).sum() - mx * my
        values.append(((2 * mx * my + 1e-4) * (2 * cov + 9e-4) / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4))).item())
    assert m.ssim(x, y)[0] == pytest.approx(sum(values) / 3, abs=1e-10)


def test_conditions():
    gray = torch.rand(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.allclose(m.condition_of(gray, "gray"), gray[:, :1], atol=1e-6)
    assert m.condition_of(torch.full((1, 3, 8, 8), 0.3), "edges").abs().max() == 0
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1  # a vertical edge: strongest response at the step, none far from it
    edges = m.condition_of(step, "edges")[0, 0]
    assert edges[:, 3:5].min() > 0.5 and edges[:, 0].max() == 0 and edges[:, 7].max() == 0
    with pytest.raises(ValueError, match="condition must be one of"):
        m.condition_of(step, "canny")


def test_learned_metrics_name_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(m.LearnedMetrics, "clip_model", "no-such-org/no-clip")
    learned = m.LearnedMetrics()
    assert "clip" in learned.missing and "no-clip" in learned.missing["clip"]
    assert set(learned.available) | set(learned.missing) == {"lpips", "clip", "dino", "fid"}
    assert learned.compute(_images(), _images(seed=1)) == {}  # nothing runs without its weights


def _run(tmp_path, *args):
    out = tmp_path / "report"
    argv = ["check-transfer", "--prompts", str(TESTBED / "prompts.txt"), "--num-images", "2", "--steps", "4",
            "--guidance", "3.5", "--height", "64", "--width", "64", "--seed", "3", "-o", str(out), *args]
    assert main(argv) == 0
    for name in ("metrics.json", "report.md", "grid.png", "images/000-original.png", "images/001-clear.png"):
        assert (out / name).is_file(), name
    return json.loads((out / "metrics.json").read_text())


def test_check_transfer_zero_shot_on_the_testbed(tmp_path):
    metrics = _run(tmp_path, "--target", str(MODELS / "dev"), "--radius", "4")
    s = metrics["summary"]
    assert metrics["setup"]["mode"] == "zero-shot" and metrics["setup"]["prompts"][1] == \
        (TESTBED / "prompts.txt").read_text().splitlines()[1]
    assert 5 < s["psnr"] < 60 and 0 < s["ssim"] < 1 and s["latent_mse"] > 0  # CLEAR changes the image, a little
    assert len(metrics["per_image"]["psnr"]) == 2
    from PIL import Image

    grid = Image.open(tmp_path / "report" / "grid.png")
    assert grid.width == 3 * 256 and grid.height == 2 * 256 + 16  # 64 px images drawn 4x, one row each


def test_a_covering_radius_changes_nothing(tmp_path):
    # r larger than the 16x16 grid's diagonal: every image query sees every key, so CLEAR is dense
    s = _run(tmp_path, "--target", str(MODELS / "dev"), "--radius", "40")["summary"]
    assert s["psnr"] > 60 and s["ssim"] > 0.9999


def test_check_transfer_with_layers_and_controlnet(tmp_path):
    metrics = _run(tmp_path, "--target", str(MODELS / "dev"), "--clear-layers", str(TESTBED / "layers" / "r4"),
                   "--controlnet", str(MODELS / "controlnet"), "--control-images", str(TESTBED / "conditions"))
    s = metrics["summary"]
    assert metrics["setup"]["mode"] == "trained CLEAR layers" and metrics["setup"]["radius"] == 4
    assert metrics["condition_error"]["kind"] == "gray"
    assert 0 < s["condition_mse_original"] < 0.05  # the ControlNet follows its condition ...
    assert 0 < s["condition_mse_clear"] < 0.05  # ... and still does with CLEAR attention


def test_dense_cache_makes_the_dense_images_once(tmp_path, monkeypatch):
    from clear_surgery.surgery.tools import transfer

    made = []
    generate = transfer._generate
    monkeypatch.setattr(transfer, "_generate", lambda pipe, s, controls, progress:
                        made.append(progress) or generate(pipe, s, controls, progress))
    cache, dev = tmp_path / "cache", str(MODELS / "dev")
    first = _run(tmp_path / "a", "--target", dev, "--radius", "4", "--dense-cache", str(cache))
    second = _run(tmp_path / "b", "--target", dev, "--radius", "8", "--dense-cache", str(cache))
    assert made == ["dense", "CLEAR", "CLEAR"]  # the second check found the dense images of the first
    assert (first["setup"]["dense_images"], second["setup"]["dense_images"]) == ("made in this run",
                                                                                "from the dense cache")
    uncached = _run(tmp_path / "c", "--target", dev, "--radius", "8")
    assert uncached["per_image"] == second["per_image"]  # the cached dense images are the ones a run makes
    # what the dense images depend on misses the cache: another seed, another model, a changed weight file
    _run(tmp_path / "d", "--target", dev, "--radius", "8", "--seed", "4", "--dense-cache", str(cache))
    _run(tmp_path / "e", "--target", str(MODELS / "schnell"), "--radius", "8", "--dense-cache", str(cache))
    assert made.count("dense") == 4 and len(list(cache.glob("dense-*.safetensors"))) == 3
    model = tmp_path / "dev"
    import shutil

    shutil.copytree(MODELS / "dev", model)
    _run(tmp_path / "f", "--target", str(model), "--radius", "8", "--dense-cache", str(cache))
    weights = next((model / "transformer").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _run(tmp_path / "g", "--target", str(model), "--radius", "8", "--dense-cache", str(cache))
    assert made.count("dense") == 6


def test_layer_deltas_add_what_the_layers_changed(tmp_path):
    from safetensors.torch import save_file

    from clear_surgery.hub.clear_layers import ClearLayersError, apply_layer_deltas

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    target = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))  # a relative: other values
    part = torch.nn.Sequential(torch.nn.Linear(4, 4))  # shares "0.*" only, as a ControlNet its first blocks
    layers = {n: t + 0.1 * torch.randn_like(t) for n, t in base.state_dict().items()}
    save_file(layers, tmp_path / "layers.safetensors")
    base_tensors = {n: t.clone() for n, t in base.state_dict().items()}
    before = {n: t.clone() for n, t in target.state_dict().items()}
    assert apply_layer_deltas(target, tmp_path / "layers.safetensors", base_tensors) == sorted(layers)
    for n, t in target.state_dict().items():
        torch.testing.assert_close(t, before[n] + layers[n] - base_tensors[n], rtol=0, atol=1e-6)
    part_before = {n: t.clone() for n, t in part.state_dict().items()}
    assert apply_layer_deltas(part, tmp_path / "layers.safetensors", base_tensors, shared_only=True) == \
        ["0.bias", "0.weight"]
    torch.testing.assert_close(part.state_dict()["0.weight"], part_before["0.weight"] + layers["0.weight"]
                               - base_tensors["0.weight"], rtol=0, atol=1e-6)
    with pytest.raises(ClearLayersError, match="do not fit"):  # without shared_only every tensor must fit
        apply_layer_deltas(part, tmp_path / "layers.safetensors", base_tensors)
    unchanged = {n: t.clone() for n, t in target.state_dict().items()}
    with pytest.raises(ClearLayersError, match="base model lacks 2"):
        apply_layer_deltas(target, tmp_path / "layers.safetensors", {n: t for n, t in base_tensors.items()
                                                                        if n.startswith("0.")})
    assert all(torch.equal(t, unchanged[n]) for n, t in target.state_dict().items())  # nothing half-written


def test_check_transfer_delta_on_schnell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the layers record their base relative to their own folder: any directory works
    metrics = _run(tmp_path, "--target", str(MODELS / "schnell"), "--clear-layers", str(TESTBED / "layers" / "r8"),
                   "--layers-mode", "delta")
    setup = metrics["setup"]
    assert setup["mode"] == "trained CLEAR layers (delta)" and setup["layers_base"] == str((MODELS / "dev").resolve())
    assert metrics["summary"]["psnr"] > 20


def test_convert_carries_layers_as_a_delta(tmp_path, monkeypatch):
    """convert --layers-mode delta (streamed from files): schnell's tensors + (layers - dev's), the rest as is."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "schnell-clear"
    assert main(["convert", "-m", str(MODELS / "schnell"), "--clear-layers", str(TESTBED / "layers" / "r8"),
                 "--layers-mode", "delta", "-o", str(out)]) == 0
    got = load_file(out / "diffusion_pytorch_model.safetensors")
    schnell = load_file(MODELS / "schnell" / "transformer" / "diffusion_pytorch_model.safetensors")
    dev = load_file(MODELS / "dev" / "transformer" / "diffusion_pytorch_model.safetensors")
    layers = load_file(TESTBED / "layers" / "r8" / "clear_layers.safetensors")
    assert set(got) == set(schnell)
    for name, value in got.items():
        expected = schnell[name] + layers[name] - dev[name] if name in layers else schnell[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "clear_config.json").read_text())
    carried = os.path.relpath((MODELS / "dev").resolve(), out.resolve())  # where the output finds it again
    assert record["training"]["carried_by"] == {"mode": "delta", "layers_base": carried}


def test_convert_delta_in_memory_of_unchanged_layers_keeps_the_target(tmp_path):
    """Layers that changed nothing in their base (zero-shot layers of tiny-flux) carried to tiny-flux-schnell as a
    delta leave schnell's tensors as they are; replacing puts tiny-flux's in their place."""
    from clear_surgery.hub import load_model

    layers = tmp_path / "layers"
    assert main(["convert", "-m", "builtin:tiny-flux", "-r", "4", "--format", "layers", "-o", str(layers)]) == 0
    for mode in ("delta", "replace"):
        assert main(["convert", "-m", "builtin:tiny-flux-schnell", "--clear-layers", str(layers), "--layers-mode",
                     mode, "-o", str(tmp_path / mode)]) == 0
    from clear_surgery.surgery import load_builtin

    schnell, dev = load_builtin("tiny-flux-schnell").state_dict(), load_builtin("tiny-flux").state_dict()
    delta, _ = load_model(str(tmp_path / "delta"))
    replace, _ = load_model(str(tmp_path / "replace"))
    name = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(schnell[name], dev[name])
    assert torch.equal(delta.state_dict()[name], schnell[name]) and torch.equal(replace.state_dict()[name], dev[name])


def test_clip_and_dino_similarity_run_from_local_folders(tmp_path, monkeypatch):
    """The learned metrics' code paths, with tiny random backbones saved locally (no weights are downloaded)."""
    from transformers import (BitImageProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              Dinov2Config, Dinov2Model)

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8)
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=16)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(**sizes).save_pretrained(tmp_path / "clip")
    Dinov2Model(Dinov2Config(**small)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(**sizes).save_pretrained(tmp_path / "dino")
    monkeypatch.setattr(m.LearnedMetrics, "clip_model", str(tmp_path / "clip"))
    monkeypatch.setattr(m.LearnedMetrics, "dino_model", str(tmp_path / "dino"))
    learned = m.LearnedMetrics()
    assert {"clip", "dino"} <= set(learned.available)
    a, b = _images(h=64, w=64), _images(seed=5, h=64, w=64)
    same, other = learned.compute(a, a.clone()), learned.compute(a, b)
    for key in ("clip_similarity", "dino_similarity"):
        assert same[key] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert all(s < 0.9999 for s in other[key])


def test_fp8_quantizes_the_clear_side_only(tmp_path, monkeypatch):
    """--quantize fp8 turns the CLEAR pipeline's linear layers to FP8 after the dense images are made (on this
    CPU torchao's FP8 cannot run: the quantization is recorded instead, and the refusal checked)."""
    import clear_surgery.surgery.tools.quantize as quantize
    import clear_surgery.surgery.tools.transfer as transfer

    refused = tmp_path / "refused"
    assert main(["check-transfer", "--target", str(MODELS / "dev"), "--radius", "4", "--prompts",
                 str(TESTBED / "prompts.txt"), "--num-images", "1", "--quantize", "fp8", "--out", str(refused)]) == 2
    assert not refused.exists()
    calls = []
    for module in (quantize, transfer):
        monkeypatch.setattr(module, "check_quantize", lambda *args: None)
    monkeypatch.setattr(transfer, "quantize_pipeline", lambda pipe, quantize: calls.append(
        (quantize, get_clear_state(pipe.transformer) is not None)))
    metrics = _run(tmp_path, "--target", str(MODELS / "dev"), "--radius", "4", "--quantize", "fp8")
    assert calls == [("fp8", True)] and metrics["setup"]["quantize"] == "fp8"
