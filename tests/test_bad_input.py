"""Every command against bad input: one ``error:`` line, exit code 2, no traceback, nothing written.

Each case runs the command line in this process (``main(argv)``, as the console script does) inside a
workspace of prepared models and files; the workspace must be byte-for-byte the same afterwards. The
cheap cases (everything that can be checked from the arguments alone) must fail before any model is
resolved or loaded: the resolver and the loaders are replaced by a guard that fails the test.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clear_surgery.surgery import load_builtin
from clear_surgery.surgery.cli import main
from conftest import cli_exe

W = "{ws}"  # the workspace, in the argument templates below
CONV, LAYERS, DENSE = f"{W}/conv", f"{W}/layers", f"{W}/dense"
TESTBED = Path(__file__).parents[1] / "recipes" / "testbed"
TB_DEV, TB_CN, TB_CONDITIONS = str(TESTBED / "models" / "dev"), str(TESTBED / "models" / "controlnet"), \
    str(TESTBED / "conditions")
TRANSFER = ["check-transfer", "--prompts", str(TESTBED / "prompts.txt"), "--num-images", "1", "-o", f"{W}/report"]

# (id, argv, what the error line must say, cheap: fails before any model is resolved)
CASES = [
    # -- usage: unknown commands and options, missing or unparsable values
    ("unknown-command", ["nope"], "No such command 'nope'", True),
    ("unknown-option", ["analyze", "--model", "builtin:tiny-flux", "--colour"], "No such option", True),
    ("missing-model", ["convert", "--out", f"{W}/o"], "Missing option '--model'", True),
    ("radius-not-a-number", ["convert", "-m", "builtin:tiny-flux", "-r", "four", "-o", f"{W}/o"], "'--radius'", True),
    # -- check-transfer: what to compare, and sources that do not fit the target
    ("transfer-no-clear", [*TRANSFER, "--target", TB_DEV], "give --clear-layers", True),
    ("transfer-controlnet-alone", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--controlnet", TB_CN],
     "--controlnet and --control-images go together", True),
    ("transfer-condition", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--condition", "sobel"],
     "condition must be one of ('gray', 'edges')", True),
    ("convert-layers-mode", ["convert", "-m", "builtin:tiny-flux-schnell", "--clear-layers", LAYERS, "--layers-mode",
                             "add", "-o", f"{W}/o"], "--layers-mode must be replace or delta", True),
    ("convert-delta-without-layers", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--layers-mode", "delta", "-o",
                                      f"{W}/o"], "--layers-mode delta needs --clear-layers", True),
    ("convert-delta-bare-file", ["convert", "-m", "builtin:tiny-flux-schnell", "--clear-layers",
                                 f"{W}/official/clear_local_4.safetensors", "--layers-mode", "delta", "-o", f"{W}/o"],
     "do not record the model they were made from: give it with --layers-base", False),
    ("transfer-layers-mode", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--layers-mode", "merge"],
     "--layers-mode must be replace or delta", True),
    ("transfer-delta-without-layers", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--layers-mode", "delta"],
     "--layers-mode delta needs --clear-layers", True),
    ("transfer-controlnet-layers-without-layers", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--controlnet", TB_CN,
                                                   "--control-images", TB_CONDITIONS, "--controlnet-attention",
                                                   "layers"], "--controlnet-attention layers needs --clear-layers",
     True),
    ("transfer-dense-cache-file", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--dense-cache",
                                   f"{W}/official/clear_local_4.safetensors"], "--dense-cache", True),
    ("transfer-no-prompts", ["check-transfer", "--target", TB_DEV, "-r", "4", "--prompts", f"{W}/none.txt", "-o",
                             f"{W}/report"], "prompt file", True),
    ("transfer-bad-control-image", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--controlnet", TB_CN,
                                    "--control-images", f"{W}/afile.txt"], "cannot be read", True),
    ("transfer-missing-layers", [*TRANSFER, "--target", TB_DEV, "--clear-layers", f"{W}/no-such-layers"],
     "no-such-layers", False),
    ("transfer-layers-other-architecture", [*TRANSFER, "--target", "builtin:tiny-sd3", "--clear-layers", LAYERS],
     "were made for a FluxTransformer2DModel", False),
    ("transfer-layers-do-not-fit", [*TRANSFER, "--target", TB_DEV, "--clear-layers", LAYERS], "do not fit", False),
    ("transfer-target-is-clear", [*TRANSFER, "--target", CONV, "-r", "4"], "give the dense model", False),
    ("transfer-controlnet-does-not-fit", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--controlnet",
                                          "builtin:tiny-flux-controlnet", "--control-images", TB_CONDITIONS],
     "does not fit the target's FluxTransformer2DModel", False),
    ("transfer-controlnet-not-controlnet", [*TRANSFER, "--target", TB_DEV, "-r", "4", "--controlnet",
                                            f"{TB_DEV}/transformer", "--control-images", TB_CONDITIONS],
     "not a ControlNet", False),
    # -- numeric options: every one has a range, checked up front
    ("radius-zero", ["convert", "-m", "builtin:tiny-flux", "-r", "0", "-o", f"{W}/o"], "--radius must be > 0", True),
    ("radius-negative", ["convert", "-m", "builtin:tiny-flux", "-r", "-2", "-o", f"{W}/o"], "--radius must be > 0", True),
    ("radius-inf", ["convert", "-m", "builtin:tiny-flux", "-r", "inf", "-o", f"{W}/o"], "finite, got inf", True),
    ("radius-nan", ["convert", "-m", "builtin:tiny-flux", "-r", "nan", "-o", f"{W}/o"], "finite, got nan", True),
    ("radius-for-inf", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--radius-for", "x*=inf", "-o", f"{W}/o"],
     "--radius-for x* must be > 0", True),
    ("radius-for-syntax", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--radius-for", "x*", "-o", f"{W}/o"],
     "PATTERN=RADIUS", True),
    ("max-shard-size", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--max-shard-size", "big", "-o", f"{W}/o"],
     "--max-shard-size takes a size", True),
    ("dtype", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--dtype", "fp8", "-o", f"{W}/o"], "unknown dtype 'fp8'",
     True),
    ("backend", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--backend", "cuda-magic", "-o", f"{W}/o"],
     "unknown backend 'cuda-magic'", True),
    ("bare-builtin-name", ["analyze", "-m", "tiny-flux"], "did you mean builtin:tiny-flux?", True),
    ("builtin-revision", ["analyze", "-m", "builtin:tiny-flux", "--revision", "v2"], "it has no revisions", False),
    ("model-is-a-file", ["analyze", "-m", f"{W}/afile.txt"], "takes a model folder, not a file", False),
    ("token-layout", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--token-layout", "zigzag", "-o", f"{W}/o"],
     "token_layout (--token-layout) must be", True),
    ("format", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--format", "gguf", "-o", f"{W}/o"],
     "--format must be full or layers", True),
    ("generate-steps-0", ["generate", "-m", "builtin:tiny-flux", "-p", "a cat", "--steps", "0", "-o", f"{W}/i.png"],
     "'--steps'", True),
    ("generate-guidance-nan", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--guidance", "nan", "-o",
                               f"{W}/i.png"], "guidance must be >= 0 and finite", True),
    ("generate-no-gpu", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--device", "cuda", "-o", f"{W}/i.png"],
     "--device cuda: this machine has no CUDA GPU", True),
    ("generate-fp8-on-cpu", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--quantize", "fp8", "-o", f"{W}/i.png"],
     "--quantize fp8: FP8 linear layers need a CUDA GPU with FP8 tensor cores", True),
    ("generate-fp8-attention-on-cpu", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--fp8-attention", "-o",
                                       f"{W}/i.png"], "--fp8-attention: FP8 attention runs on Hopper GPUs", True),
    ("bench-fp8-attention-on-cpu", ["bench", "--fp8-attention", "--device", "cpu", "-o", f"{W}/b"],
     "--fp8-attention: FP8 attention runs on Hopper GPUs", True),
    ("bench-quantize", ["bench", "--quantize", "int8", "--device", "cpu", "-o", f"{W}/b"],
     "--quantize must be one of fp8, got 'int8'", True),
    ("profile-bad-device", ["profile", "-m", "builtin:tiny-flux", "--device", "tpu9", "-o", f"{W}/p"],
     "--device 'tpu9' is not a device", True),
    ("generate-strength", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--strength", "1.5", "-o", f"{W}/i.png"],
     "strength must be in (0, 1]", True),
    ("generate-ntk", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--ntk-factor", "0", "-o", f"{W}/i.png"],
     "ntk-factor must be > 0 and finite", True),
    ("generate-seed", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--seed", "-1", "-o", f"{W}/i.png"],
     "'--seed'", True),
    ("generate-radius-inf", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "--radius", "inf", "-o", f"{W}/i.png"],
     "--radius must be > 0 and finite", True),
    ("generate-no-prompt", ["generate", "-m", "builtin:tiny-flux", "-o", f"{W}/i.png"], "--prompt is required", True),
    ("profile-steps-0", ["profile", "-m", "builtin:tiny-flux", "--steps", "0", "-o", f"{W}/p"], "'--steps'", True),
    ("profile-radii-zero", ["profile", "-m", "builtin:tiny-flux", "--radii", "0,4", "-o", f"{W}/p"],
     "--radii must be > 0", True),
    ("profile-radii-negative", ["profile", "-m", "builtin:tiny-flux", "--radii", "-2", "-o", f"{W}/p"],
     "--radii must be > 0", True),
    ("profile-radii-text", ["profile", "-m", "builtin:tiny-flux", "--radii", "a,b", "-o", f"{W}/p"],
     "--radii takes comma-separated numbers", True),
    ("profile-keep", ["profile", "-m", "builtin:tiny-flux", "--keep", "1.5", "-o", f"{W}/p"], "--keep must be in (0, 1]",
     True),
    ("profile-queries", ["profile", "-m", "builtin:tiny-flux", "--queries", "0", "-o", f"{W}/p"], "'--queries'", True),
    ("export-batch", ["export", CONV, "-f", "onnx", "--batch", "0", "-o", f"{W}/e"], "'--batch'", True),
    ("export-text-len", ["export", CONV, "-f", "onnx", "--text-len", "0", "-o", f"{W}/e"], "'--text-len'", True),
    ("export-size-syntax", ["export", CONV, "-f", "onnx", "--min-size", "big", "-o", f"{W}/e"],
     "--min-size takes HEIGHTxWIDTH", False),
    ("export-size-order", ["export", CONV, "-f", "onnx", "--min-size", "1024", "--max-size", "512", "-o", f"{W}/e"],
     "min <= opt <= max", False),
    ("export-format", ["export", CONV, "-f", "gguf", "-o", f"{W}/e"], "--format must be one of", False),
    ("bench-sizes", ["bench", "--sizes", "0", "--device", "cpu", "-o", f"{W}/b"], "--sizes must be > 0", True),
    ("bench-radii", ["bench", "--radii", "-1", "--device", "cpu", "-o", f"{W}/b"], "--radii must be > 0", True),
    ("bench-backend", ["bench", "--backends", "warp-drive", "--device", "cpu", "-o", f"{W}/b"],
     "--backends: unknown ['warp-drive']", True),
    ("bench-device", ["bench", "--device", "tpu9", "-o", f"{W}/b"], "--device 'tpu9' is not a device", True),
    # -- commands that need hardware or a library this machine lacks
    ("bench-needs-cuda", ["bench", "-o", f"{W}/b"], "this machine has no CUDA GPU", True),
    ("distill-needs-cuda", ["distill", "--recipe", f"{W}/recipe.toml", "--device", "cuda", "-o", f"{W}/d"],
     "this machine has no CUDA GPU", True),
    ("export-aoti-needs-cuda", ["export", CONV, "-f", "aoti", "-o", f"{W}/e"], "needs a CUDA GPU", False),
    ("export-tensorrt-missing", ["export", CONV, "-f", "tensorrt", "-o", f"{W}/e"], "TensorRT is not installed", False),
    # -- output paths: checked before any work
    ("generate-out-extension", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "-o", f"{W}/image.xyz"],
     "unknown file type '.xyz'", True),
    ("generate-out-folder", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "-o", f"{W}/adir"], "is a folder", True),
    ("generate-out-exists", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "-o", f"{W}/old.png"],
     "already exists (pass --overwrite to replace it)", True),
    ("analyze-json-exists", ["analyze", "-m", "builtin:tiny-flux", "--json", f"{W}/afile.txt"],
     "already exists (pass --overwrite to replace it)", True),
    ("generate-out-unwritable", ["generate", "-m", "builtin:tiny-flux", "-p", "a", "-o", "/proc/x/i.png"],
     "cannot write in /proc", True),
    ("analyze-json-folder", ["analyze", "-m", "builtin:tiny-flux", "--json", f"{W}/adir"], "is a folder", True),
    ("convert-out-exists", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "-o", f"{W}/adir"], "already exists", True),
    ("convert-out-is-file", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "-o", f"{W}/afile.txt"],
     "is a file, not a folder", True),
    ("profile-out-exists", ["profile", "-m", "builtin:tiny-flux", "-o", f"{W}/adir"], "already exists", True),
    ("export-out-exists", ["export", CONV, "-f", "onnx", "-o", f"{W}/adir"], "already exists", True),
    ("export-timing-cache", ["export", CONV, "-f", "onnx", "--timing-cache", f"{W}/none.cache", "-o", f"{W}/e"],
     "--timing-cache", True),
    ("bench-out-is-file", ["bench", "--device", "cpu", "-o", f"{W}/afile.txt"], "is a file, not a folder", True),
    # -- missing, corrupted or truncated files: the message names the file
    ("truncated-shard-analyze", ["analyze", "-m", f"{W}/dense-truncated"], "diffusion_pytorch_model.safetensors",
     False),
    ("truncated-shard-convert", ["convert", "-m", f"{W}/dense-truncated", "-r", "4", "-o", f"{W}/o"],
     "diffusion_pytorch_model.safetensors", False),
    ("truncated-shard-generate", ["generate", "-m", f"{W}/conv-truncated", "-p", "a", "-o", f"{W}/i.png"],
     "diffusion_pytorch_model.safetensors", False),
    ("truncated-layers-file", ["convert", "-m", "builtin:tiny-flux", "--clear-layers", f"{W}/clear_local_4.safetensors",
                               "-o", f"{W}/o"], "clear_local_4.safetensors", False),
    ("not-safetensors", ["convert", "-m", "builtin:tiny-flux", "--clear-layers", f"{W}/afile.txt", "-r", "4",
                         "-o", f"{W}/o"], "afile.txt", False),
    ("truncated-clear-config", ["convert", "-m", f"{W}/conv-badjson", "-o", f"{W}/o"], "clear_config.json", False),
    ("truncated-config", ["analyze", "-m", f"{W}/dense-badjson"], "config.json", False),
    ("missing-folder", ["analyze", "-m", "./no/such/folder"], "no such model folder: ./no/such/folder", False),
    ("missing-recipe", ["distill", "--recipe", f"{W}/none.toml"], "recipe file", True),
    ("broken-recipe", ["distill", "--recipe", f"{W}/broken.toml"], "broken.toml is not valid TOML", False),
    ("generate-recipe-key", ["generate", "-m", "builtin:tiny-flux", "--recipe", f"{W}/generate.toml", "-o",
                             f"{W}/i.png"], "unknown [generate] keys ['colour']", True),
    ("generate-broken-recipe", ["generate", "-m", "builtin:tiny-flux", "--recipe", f"{W}/broken.toml", "-o",
                                f"{W}/i.png"], "broken.toml is not valid TOML", True),
    ("push-not-clear", ["push-to-hub", DENSE, "--repo-id", "me/x", "--dry-run"], "push-to-hub uploads a CLEAR folder",
     False),
    ("export-dense", ["export", DENSE, "-f", "onnx", "-o", f"{W}/e"], "without CLEAR attention", False),
    ("unknown-builtin", ["analyze", "-m", "builtin:tiny-nothing"], "unknown built-in model", False),
    # -- silent mismatches, now errors
    ("layers-other-architecture", ["convert", "-m", "builtin:tiny-sd3", "--clear-layers", f"{W}/layers-sd3-as-flux",
                                   "-o", f"{W}/o"], "were made for a FluxTransformer2DModel", False),
    ("layers-other-radius", ["convert", "-m", "builtin:tiny-flux", "--clear-layers", LAYERS, "-r", "8", "-o", f"{W}/o"],
     "were made for r=4, not r=8", False),
    ("official-file-other-radius", ["convert", "-m", "builtin:tiny-flux", "--clear-layers",
                                    f"{W}/official/clear_local_4.safetensors", "-r", "8", "-o", f"{W}/o"],
     "were made for r=4, not r=8", False),
    ("generate-radius-on-clear", ["generate", "-m", CONV, "-p", "a", "--radius", "8", "-o", f"{W}/i.png"],
     "already: --radius converts a dense model", False),
    ("push-bad-repo-id", ["push-to-hub", CONV, "--repo-id", "bad id!!", "--dry-run"], "is not a valid Hub repo id",
     True),
    ("push-repo-id-no-owner", ["push-to-hub", CONV, "--repo-id", "a/b/c", "--dry-run"], "is not a valid Hub repo id",
     True),
    # -- messages that name the flag the user typed
    ("unmatched-target", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--target", "nothing*", "-o", f"{W}/o"],
     "--target pattern 'nothing*' matches no attention module", False),
    ("unmatched-radius-for", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--radius-for", "nothing*=2", "-o",
                              f"{W}/o"], "--radius-for pattern 'nothing*'", False),
    ("exclude-everything", ["convert", "-m", "builtin:tiny-flux", "-r", "4", "--exclude", "*", "-o", f"{W}/o"],
     "--target / --exclude) leave no attention site", False),
    ("layers-and-layers-folder", ["convert", "-m", LAYERS, "--clear-layers", LAYERS, "-o", f"{W}/o"],
     "is a CLEAR-layers folder already", False),
]


class ModelTouched(BaseException):
    """Raised by the guard: a cheap case reached the model resolver or a loader."""


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad-input")
    assert main(["convert", "-m", "builtin:tiny-flux", "-r", "4", "-o", str(ws / "conv")]) == 0
    assert main(["convert", "-m", "builtin:tiny-flux", "-r", "4", "--format", "layers", "-o", str(ws / "layers")]) == 0
    assert main(["convert", "-m", "builtin:tiny-sd3", "-r", "4", "--format", "layers", "-o", str(ws / "sd3")]) == 0
    load_builtin("tiny-flux").save_pretrained(ws / "dense")
    # SD3 layers whose config says FLUX: names and shapes fit the SD3 model, the architecture does not
    shutil.copytree(ws / "sd3", ws / "layers-sd3-as-flux")
    meta = json.loads((ws / "sd3" / "clear_config.json").read_text())
    (ws / "layers-sd3-as-flux" / "clear_config.json").write_text(json.dumps({**meta, "model_class":
                                                                                 "FluxTransformer2DModel"}))
    (ws / "official").mkdir()
    shutil.copy(ws / "layers" / "clear_layers.safetensors", ws / "official" / "clear_local_4.safetensors")
    shutil.copy(ws / "layers" / "clear_layers.safetensors", ws / "clear_local_4.safetensors")
    _truncate(ws / "clear_local_4.safetensors")
    for name in ("dense", "conv"):
        shutil.copytree(ws / name, ws / f"{name}-truncated")
        _truncate(ws / f"{name}-truncated" / "diffusion_pytorch_model.safetensors")
    shutil.copytree(ws / "dense", ws / "dense-badjson")
    _truncate(ws / "dense-badjson" / "config.json")
    shutil.copytree(ws / "conv", ws / "conv-badjson")
    _truncate(ws / "conv-badjson" / "clear_config.json")
    (ws / "adir").mkdir()
    (ws / "afile.txt").write_text("not a model\n")
    (ws / "old.png").write_bytes(b"an image the user keeps")
    (ws / "broken.toml").write_text("[generate\nprompt = 'a'\n")
    (ws / "generate.toml").write_text("[generate]\nprompt = 'a'\nheight = 64\nwidth = 64\ncolour = 'red'\n")
    (ws / "recipe.toml").write_text((Path(__file__).parents[1] / "recipes" / "tiny-flux-r2.toml").read_text())
    return ws


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def model_guard(monkeypatch):
    """Fail the test if anything resolves or loads a model."""
    import clear_surgery.hub.resolve as resolve
    import clear_surgery.surgery.tools.pipeline as pipeline

    def touched(*args, **kwargs):
        raise ModelTouched(f"a model was resolved or loaded: {args[:1]}")

    for module, name in ((resolve, "_local"), (resolve, "_hub"), (resolve, "load_builtin"),
                         (resolve, "resolve_model"), (pipeline, "tiny_pipeline")):
        monkeypatch.setattr(module, name, touched)


def test_the_table_covers_every_command_and_class():
    from clear_surgery.surgery.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    used = {argv[0] for _, argv, _, _ in CASES}
    assert commands - {"coverage"} <= used, commands - used  # coverage takes no input
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv,message,cheap", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(workspace, request, capsys, monkeypatch, argv, message, cheap):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same on a machine with a GPU
    if cheap:
        request.getfixturevalue("model_guard")
    argv = [a.replace(W, str(workspace)) for a in argv]
    before = _snapshot(workspace)
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err
    assert len(errors) == 1, captured.err
    assert message in errors[0], errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(workspace) == before  # nothing written, nothing left behind


# -- offline: a machine without a network, in a fresh process as a user runs it

NO_NETWORK = """
import socket
import time


def unreachable(*args, **kwargs):
    with open({log!r}, "a") as f:
        f.write(f"{{time.time()}} {{args[1:2] or args[:1]!r}}\\n")
    raise OSError(101, "Network is unreachable")

socket.socket.connect = unreachable
socket.socket.connect_ex = unreachable
socket.create_connection = unreachable
"""


def _offline_env(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose Python cannot open a socket (a sitecustomize guard); attempts are logged."""
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "connections.log"
    (site / "sitecustomize.py").write_text(NO_NETWORK.format(log=str(log)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_ENDPOINT", None)
    return env, log


@pytest.mark.parametrize("argv", [
    ["analyze", "--model", "no-such-org/no-such-model"],
    ["convert", "--model", "typo-folder/model", "--radius", "4", "--out", "{tmp}/out"],
    ["convert", "--model", "builtin:tiny-flux", "--clear-layers", "someone/clear/clear_local_8.safetensors",
     "--out", "{tmp}/out"],
    ["push-to-hub", "{tmp}/conv", "--repo-id", "me/tiny-clear"],
], ids=["hub-id", "folder-typed-without-dot-slash", "hub-file", "push"])
def test_offline_hub_fails_fast_and_says_what_to_do(tmp_path, argv):
    env, log = _offline_env(tmp_path)
    if "push-to-hub" in argv:
        assert main(["convert", "-m", "builtin:tiny-flux", "-r", "4", "-o", str(tmp_path / "conv")]) == 0
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([cli_exe(), *argv], capture_output=True, text=True, env=env, timeout=120)
    ended = time.time()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr
    assert "cannot be reached" in errors[0], errors[0]
    assert ("HF_HUB_OFFLINE=1" if argv[0] != "push-to-hub" else "--dry-run") in errors[0], errors[0]
    assert log.exists()  # the guard was in force, and was hit
    # fast from the first connection attempt to the exit (no retries, no timeouts), however long the imports took
    first_attempt = min(float(line.split()[0]) for line in log.read_text().splitlines())
    assert ended - first_attempt < 5, f"{ended - first_attempt:.1f} s after the first attempt"
    assert not (tmp_path / "out").exists()


def test_local_conversion_makes_no_network_request(tmp_path):
    """A local model converted and saved, a CLEAR folder checked for upload, the Python API with a Hub model as
    the base (its card's license is looked up in the cache only): not one connection attempt. One fresh process
    runs them all (the guard holds process-wide), so the suite pays for one start-up."""
    env, log = _offline_env(tmp_path)
    load_builtin("tiny-flux").save_pretrained(tmp_path / "dense")
    commands = [["convert", "--model", str(tmp_path / "dense"), "--radius", "4", "--out", str(tmp_path / "conv")],
                ["convert", "--model", "builtin:tiny-flux", "--radius", "4", "--format", "layers", "--out",
                 str(tmp_path / "layers")],
                ["push-to-hub", str(tmp_path / "conv"), "--repo-id", "me/tiny-clear", "--dry-run"]]
    script = ("from clear_surgery.surgery.cli import main\n"
              "from clear_surgery.hub import save_converted\n"
              "from clear_surgery.surgery import ClearConfig, apply_clear, load_builtin\n"
              f"codes = [main(argv) for argv in {commands!r}]\n"
              "assert codes == [0, 0, 0], codes\n"
              "model = load_builtin('tiny-flux')\n"
              "apply_clear(model, ClearConfig(radius=4))\n"
              f"save_converted(model, {str(tmp_path / 'api')!r},\n"
              "               base_model={'id': 'black-forest-labs/FLUX.1-dev'})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / name / "clear_config.json").is_file() for name in ("conv", "layers", "api"))
    assert not log.exists(), log.read_text()


def test_network_guard_can_fail(tmp_path):
    """The guard above is real: a Hub id does try the network, and the attempt is logged."""
    env, log = _offline_env(tmp_path)
    subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('huggingface.co', 443))"],
                   env=env, capture_output=True)
    assert log.exists()


def test_bad_input_through_the_entry_point(tmp_path):
    """The console script itself: exit code 2, one line, for a usage error and an error found by a command."""
    for argv in (["convert", "--model", "builtin:tiny-flux", "--radius", "inf", "--out", str(tmp_path / "o")],
                 ["generate", "--model", "builtin:tiny-flux", "--prompt", "a", "--out", str(tmp_path / "i.xyz")],
                 ["profile", "--model", "builtin:tiny-flux", "--steps", "0"]):
        done = subprocess.run([cli_exe(), *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr, \
            done.stderr
    assert list(tmp_path.iterdir()) == []


def test_radius_change_is_allowed_when_asked(tmp_path, caplog):
    assert main(["convert", "-m", "builtin:tiny-flux", "-r", "4", "--format", "layers", "-o", str(tmp_path / "l")]) == 0
    assert main(["convert", "-m", "builtin:tiny-flux", "--clear-layers", str(tmp_path / "l"), "-r", "8",
                 "--allow-radius-change", "-o", str(tmp_path / "o")]) == 0
    assert "made for r=4 at r=8" in caplog.text
    meta = json.loads((tmp_path / "o" / "clear_config.json").read_text())
    assert meta["config"]["radius"] == 8


def test_clear_layers_folder_gives_its_radius(tmp_path):
    """--clear-layers takes a CLEAR-layers folder (from convert --format layers or distill) and its radius."""
    assert main(["convert", "-m", "builtin:tiny-flux", "-r", "3", "--format", "layers", "-o", str(tmp_path / "l")]) == 0
    assert main(["convert", "-m", "builtin:tiny-flux", "--clear-layers", str(tmp_path / "l"),
                 "-o", str(tmp_path / "o")]) == 0
    meta = json.loads((tmp_path / "o" / "clear_config.json").read_text())
    assert meta["config"]["radius"] == 3 and meta["training"]["method"] == "imported CLEAR layers"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """README's Python block, executed as written (in an empty folder: it saves one)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- python-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "tiny-flux-clear4-py" / "clear_config.json").is_file()


def test_help_keeps_bracketed_words(capsys):
    assert main(["generate", "--help"]) == 0
    assert "[generate]" in capsys.readouterr().out


def test_failed_trace_prints_no_graph(capfd):
    """torch.export prints the partial graph of a model it cannot trace; the analysis keeps it quiet."""
    from clear_surgery.surgery import analyze
    from clear_surgery.surgery import build_tiny_model, tiny_models

    model, inputs, text, image = build_tiny_model(next(n for n in tiny_models() if n.startswith("QwenImage 2.1")))
    capfd.readouterr()
    with pytest.raises(Exception):
        analyze(model, inputs, text_tokens=text, image_tokens=image, run_time_fallback=False)
    assert "def forward" not in capfd.readouterr().err
    report = analyze(model, inputs, text_tokens=text, image_tokens=image)  # falls back to the run-time analysis
    assert report.method.startswith("run time") and "def forward" not in capfd.readouterr().err
