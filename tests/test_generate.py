import hashlib

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clear_surgery.surgery import get_clear_state
from clear_surgery.surgery.cli import app
from clear_surgery.surgery.tools.generate import GenerateError, GenerateSettings, generate, load_pipeline

runner = CliRunner()


def gen(tmp_path, name, *args):
    out = tmp_path / name
    result = runner.invoke(app, ["generate", "--prompt", "a red robot in the city", "--steps", "2", "--out", str(out),
                                 *args])
    return result, out


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_flux_two_resolutions_and_sdedit_deterministic(tmp_path):
    common = ["--model", "builtin:tiny-flux", "--radius", "2"]
    for name, size in (("a.png", ["--height", "64", "--width", "96"]), ("b.png", ["--height", "128", "--width", "128"]),
                       ("c.png", ["--height", "128", "--width", "96", "--from-size", "64", "--strength", "0.6"])):
        result, out = gen(tmp_path, name, *common, *size)
        assert result.exit_code == 0, result.output
        image = Image.open(out)
        assert image.format == "PNG" and image.size == (int(size[3]), int(size[1]))
    again, out = gen(tmp_path, "c2.png", *common, "--height", "128", "--width", "96", "--from-size", "64",
                     "--strength", "0.6")
    assert again.exit_code == 0 and digest(out) == digest(tmp_path / "c.png")
    other_seed, out = gen(tmp_path, "c3.png", *common, "--height", "128", "--width", "96", "--from-size", "64",
                          "--strength", "0.6", "--seed", "1")
    assert digest(out) != digest(tmp_path / "c.png")


@pytest.mark.parametrize("flag", ["--compile", "--compile-regional"])
def test_compile_gives_the_eager_image(tmp_path, flag):
    """--compile: the transformer runs through torch.compile (dynamo captured graphs) and the image is the eager
    one up to the fused kernels' rounding. --compile-regional: the same, each block compiled (the blocks' graphs
    are shared: fewer than the model's blocks)."""
    import numpy as np
    from torch._dynamo.utils import counters

    common = ["--model", "builtin:tiny-flux", "--radius", "2", "--height", "64", "--width", "64"]
    eager, eager_out = gen(tmp_path, "eager.png", *common)
    assert eager.exit_code == 0, eager.output
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_out = gen(tmp_path, "compiled.png", *common, flag)
    assert compiled.exit_code == 0, compiled.output
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    if flag == "--compile-regional":
        blocks = load_pipeline("builtin:tiny-flux").transformer
        assert counters["stats"]["unique_graphs"] < len(blocks.transformer_blocks) + len(blocks.single_transformer_blocks)
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (eager_out, compiled_out))
    assert np.abs(a - b).max() <= 3
    torch._dynamo.reset()


def test_generate_from_a_converted_folder_and_sd3(tmp_path):
    assert runner.invoke(app, ["convert", "--model", "builtin:tiny-flux", "--radius", "3", "--out",
                               str(tmp_path / "conv")]).exit_code == 0
    result, out = gen(tmp_path, "f.png", "--model", str(tmp_path / "conv"), "--require-clear", "--height", "64",
                      "--width", "64")
    assert result.exit_code == 0, result.output
    result, out = gen(tmp_path, "s.png", "--model", "builtin:tiny-sd3", "--radius", "2", "--height", "64",
                      "--width", "32", "--from-size", "32")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 64)


def test_high_resolution_settings_change_the_image():
    pipe = load_pipeline("builtin:tiny-flux", radius=2)
    base = GenerateSettings("a cat", 64, 64, steps=2)
    plain = generate(pipe, base, progress=False).tobytes()
    assert generate(pipe, GenerateSettings("a cat", 64, 64, steps=2, ntk_factor=4), progress=False).tobytes() != plain
    assert generate(pipe, GenerateSettings("a cat", 64, 64, steps=2, proportional_attention=True),
                    progress=False).tobytes() != plain
    assert generate(pipe, base, progress=False).tobytes() == plain  # settings are undone after each call
    assert pipe.transformer.pos_embed.theta == 10000 and not get_clear_state(pipe.transformer).runtime.routes


@pytest.mark.parametrize("args,message", [
    (["--height", "62"], "height 62 is not a positive multiple of 4"),
    (["--from-size", "30"], "from-size 30 is not a positive multiple of 4"),
    (["--strength", "0"], "strength must be in (0, 1]"),
    (["--strength", "1.5"], "strength must be in (0, 1]"),
])
def test_bad_settings_fail_with_one_message(tmp_path, args, message):
    result, out = gen(tmp_path, "x.png", "--model", "builtin:tiny-flux", "--radius", "2", "--width", "64", *args)
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_require_clear_refuses_a_dense_model(tmp_path):
    result, out = gen(tmp_path, "x.png", "--model", "builtin:tiny-flux", "--require-clear", "--height", "64",
                      "--width", "64")
    assert result.exit_code == 2 and "has no CLEAR attention (--require-clear)" in result.output
    with pytest.raises(GenerateError, match="needs a CLEAR model"):
        generate(load_pipeline("builtin:tiny-flux"), GenerateSettings("a", 64, 64, steps=1, proportional_attention=True))


def test_highres_recipe_parses_and_runs_scaled_down(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "highres-flux-dev.toml"
    settings = GenerateSettings.from_recipe(recipe, prompt="a castle")
    assert (settings.height, settings.width, settings.from_size, settings.ntk_factor) == (2048, 4096, 1024, 10)
    assert settings.proportional_attention and settings.require_clear and settings.refine_shift == 10
    # the same recipe on the tiny model, at a size a CPU can do
    result, out = gen(tmp_path, "r.png", "--model", "builtin:tiny-flux", "--radius", "2", "--recipe", str(recipe),
                      "--height", "64", "--width", "128", "--from-size", "64")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (128, 64)
    bad = tmp_path / "bad.toml"
    bad.write_text("[generate]\nheight = 64\nwidht = 64\n")
    with pytest.raises(GenerateError, match=r"unknown \[generate\] keys \['widht'\]"):
        GenerateSettings.from_recipe(bad, prompt="x")


@pytest.mark.parametrize("command", ["generate", "profile"])
def test_the_pipeline_runs_on_the_device_asked(command, tmp_path, monkeypatch):
    """--device moves the whole pipeline there (default: the GPU when there is one)."""
    import diffusers

    from clear_surgery.surgery.cli import main
    from clear_surgery.surgery.tools.arguments import run_device

    moved = []
    real_to = diffusers.DiffusionPipeline.to

    def to(self, *args, **kwargs):
        moved.append(str(args[0]) if args else str(kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", to)
    argv = {"generate": ["generate", "-m", "builtin:tiny-flux", "--radius", "2", "-p", "a cat", "--height", "64",
                         "--width", "64", "--steps", "1", "-o", str(tmp_path / "i.png")],
            "profile": ["profile", "-m", "builtin:tiny-flux", "--resolution", "64", "--steps", "1", "--radii", "2",
                        "-o", str(tmp_path / "p")]}[command]
    assert main([*argv, "--device", "cpu"]) == 0
    assert moved == ["cpu"]
    assert run_device("--device", None) == ("cuda" if torch.cuda.is_available() else "cpu")
