import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

from clear_surgery.surgery import get_clear_state, load_builtin
from clear_surgery.surgery.cli import app
from conftest import cli_exe

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_convert_builtin_and_load_back_through_the_entry_point(tmp_path):
    out = tmp_path / "tiny-flux-clear4"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    exe = cli_exe()
    done = subprocess.run([exe, "convert", "--model", "builtin:tiny-flux", "--radius", "4", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "converted 4 joint attention sites to CLEAR (r=4)" in done.stdout
    assert "convert: 100%" in done.stderr  # progress shown
    meta = json.loads((out / "clear_config.json").read_text())
    assert meta["config"]["radius"] == 4 and meta["base_model"]["id"] == "builtin:tiny-flux"
    result = run("analyze", "--model", str(out), "--json", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    sites = json.loads((tmp_path / "report.json").read_text())["sites"]
    assert [s["op"] for s in sites] == ["clear"] * 4


def test_analyze_sd3_table():
    result = run("analyze", "--model", "builtin:tiny-sd35")
    assert result.exit_code == 0, result.output
    assert "image_first" in result.output and "no: image-only" in result.output


def test_convert_local_pipeline_folder_with_dtype(tmp_path):
    pipeline = tmp_path / "pipe"
    load_builtin("tiny-sd3").save_pretrained(pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    result = run("convert", "--model", str(pipeline), "--radius", "3", "--out", str(tmp_path / "out"), "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "clear_config.json").read_text())
    assert meta["dtype"] == ["bfloat16"] and meta["base_model"]["subfolder"] == "transformer"


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-org/no-such-model"], "cannot load 'no-such-org/no-such-model' from the Hub"),
    (["--model", "./missing/folder"], "no such model folder: ./missing/folder"),
    (["--model", "builtin:tiny-nothing"], "unknown built-in model 'builtin:tiny-nothing'"),
    (["--model", "builtin:tiny-flux", "--radius", "0"], "radius must be > 0"),
    (["--model", "builtin:tiny-flux", "--radius", "-2"], "radius must be > 0"),
    (["--model", "builtin:tiny-flux", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--model", "builtin:tiny-flux", "--exclude", "*"], "leave no attention site"),
])
def test_bad_input_gives_one_clear_error(tmp_path, args, message):
    if "--radius" not in args:
        args = [*args, "--radius", "4"]
    result = run("convert", *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_model_folder_without_joint_attention(tmp_path):
    import diffusers

    diffusers.PixArtTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                                       out_channels=8, sample_size=8, cross_attention_dim=16,
                                       caption_channels=16).save_pretrained(tmp_path / "pixart")
    result = run("convert", "--model", str(tmp_path / "pixart"), "--radius", "4", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert ("PixArtTransformer2DModel has no joint text-image attention to convert: found 2 attention sites "
            "(1 cross, 1 image)") in result.output


def test_unknown_model_class(tmp_path):
    import diffusers

    diffusers.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=8, sample_size=8,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    result = run("convert", "--model", str(tmp_path / "unet"), "--radius", "4", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "UNet2DModel is not a model family clear-surgery knows" in result.output


def test_existing_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "already exists (pass --overwrite" in result.output
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--out", str(tmp_path / "out"),
                 "--overwrite")
    assert result.exit_code == 0, result.output


def test_convert_with_tile_layout_loads_back_tiled(tmp_path):
    from clear_surgery.hub import load_converted

    result = run("convert", "--model", "builtin:tiny-sd3", "--radius", "3", "--out", str(tmp_path / "out"),
                 "--token-layout", "tiled")
    assert result.exit_code == 0, result.output
    assert get_clear_state(load_converted(tmp_path / "out")).runtime.tile == (8, 16)  # head dim 8: the generic default


def test_convert_with_per_layer_radius(tmp_path):
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--radius-for", "single_*=8",
                 "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "clear_config.json").read_text())
    assert meta["config"]["radius_overrides"] == {"single_*": 8.0}
    assert "per-layer radii" in (tmp_path / "out" / "README.md").read_text()
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--radius-for", "nope.*=8",
                 "--out", str(tmp_path / "bad"))
    assert result.exit_code == 2 and "'nope.*' matches no converted attention module" in result.output
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--radius-for", "single_*",
                 "--out", str(tmp_path / "bad"))
    assert result.exit_code == 2 and "--radius-for takes PATTERN=RADIUS" in result.output


def test_per_layer_radii_are_in_the_summary_and_a_plain_card_lists_only_what_it_stored(tmp_path):
    result = run("convert", "--model", "builtin:tiny-flux", "--radius", "4", "--radius-for",
                 "single_transformer_blocks.*=2", "--format", "layers", "--out", str(tmp_path / "layers"))
    assert result.exit_code == 0, result.output
    assert "(r=4; r=2 for single_transformer_blocks.*)" in result.output
    card = (tmp_path / "layers" / "README.md").read_text()
    assert "selected by" in card and "spatial_weight" not in card  # plain CLEAR stores no pooled-key weights


@pytest.mark.parametrize("command", ["analyze", "convert", "profile", "generate", "check-transfer", "coverage",
                                     "distill", "push-to-hub", "export", "bench"])
def test_help_shows_what_to_type_not_python_types(command, capsys, monkeypatch):
    from clear_surgery.surgery.cli import main

    monkeypatch.setenv("COLUMNS", "120")
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert not [t for t in ("<str>", "<bool>", "<int>", "<float>", "<path>", "<list", "{model}") if t in text], text
    if command == "export":
        assert "FORMAT" in text and "OUT_FORMAT" not in text  # the flag's name, not the Python parameter's
    if command == "bench":  # the default list in full, not cut off
        flat = " ".join(text.replace("│", " ").split())
        assert "dense-cudnn, dense-flash, flex-raster, flex-tiled, triton-tiled, gluon-tiled" in flat


def test_a_command_prints_no_library_notices(tmp_path):
    """Only what the command says: no notices of the libraries it imports (torchao, which diffusers imports
    when it is installed, reports its optional GPU libraries and enum registrations on import)."""
    done = subprocess.run([cli_exe(), "analyze", "--model", "builtin:tiny-flux"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
