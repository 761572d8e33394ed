"""Checkpoints as they come: converting keeps the stored dtype, works from files without loading the
model (same bytes for zero-shot, one tensor at a time for what changes), and fails cleanly on damaged
files or a full disk."""

import errno
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from clear_surgery.hub import load_converted, load_model
from clear_surgery.hub.checkpoint import weight_files
from clear_surgery.hub.safetensors_io import read_header, read_tensor, write_file
from clear_surgery.surgery import ClearConfig, get_clear_state, load_builtin, tiny_pipeline
from clear_surgery.surgery.cli import app
from clear_surgery.surgery.tools.bench import FLUX_DEV, write_random_checkpoint
from clear_surgery.surgery.tools.convert import convert

# FLUX.1-dev's architecture at about 100 M parameters: 200 MB in bf16
MID_FLUX = dict(FLUX_DEV, num_layers=5, num_single_layers=14, attention_head_dim=64, num_attention_heads=8,
                joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(16, 24, 24))


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("error: ")], result.output


def tensors_of(folder: Path) -> dict:
    out = {}
    for path in weight_files(folder):
        header = read_header(path)
        out.update({name: read_tensor(header, name) for name in header.tensors})
    return out


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "tiny-flux-bf16"
    load_builtin("tiny-flux", torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    assert len(weight_files(folder)) > 2
    return folder


def test_a_bf16_model_stays_bf16(bf16_folder, tmp_path):
    code, errors, output = run("convert", "--model", bf16_folder, "--radius", "3", "--out", tmp_path / "out")
    assert code == 0, output
    assert {e.dtype for p in weight_files(tmp_path / "out") for e in read_header(p).tensors.values()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "clear_config.json").read_text())["dtype"] == ["bfloat16"]
    assert next(load_converted(tmp_path / "out").parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(bf16_folder))  # the resolver every command uses
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(str(bf16_folder), dtype=torch.float16)  # unless asked for another
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_a_bf16_pipeline_stays_bf16(tmp_path):
    from clear_surgery.surgery.tools.pipeline import load_pipeline

    pipe = tiny_pipeline("builtin:tiny-flux")
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "pipe")
    assert load_pipeline(str(tmp_path / "pipe")).transformer.dtype == torch.bfloat16


def test_zero_shot_convert_writes_the_same_bytes(bf16_folder, tmp_path):
    shards = weight_files(bf16_folder)
    copied = convert(str(bf16_folder), tmp_path / "copied", ClearConfig(radius=3), link=False, progress=False)
    assert copied.streamed and (copied.linked, copied.copied, copied.rewritten) == (0, len(shards), 0)
    result = convert(str(bf16_folder), tmp_path / "out", ClearConfig(radius=3), progress=False)
    assert result.streamed and result.linked + result.copied == len(shards) and result.rewritten == 0
    for source in shards:
        assert filecmp.cmp(source, tmp_path / "out" / source.name, shallow=False)
        assert filecmp.cmp(source, tmp_path / "copied" / source.name, shallow=False)
        assert (tmp_path / "copied" / source.name).stat().st_ino != source.stat().st_ino
    assert filecmp.cmp(bf16_folder / "config.json", tmp_path / "out" / "config.json", shallow=False)
    # stock diffusers reads it as the dense model, with the same tensors
    import diffusers

    stock = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
    source = tensors_of(bf16_folder)
    assert all(torch.equal(t, source[n]) for n, t in stock.state_dict().items())
    assert get_clear_state(load_converted(tmp_path / "out")).sites == result.sites


def test_streamed_conversions_change_exactly_what_they_say(bf16_folder, tmp_path):
    source = tensors_of(bf16_folder)
    convert(str(bf16_folder), tmp_path / "fp16", ClearConfig(radius=3), dtype=torch.float16, progress=False)
    fp16 = tensors_of(tmp_path / "fp16")
    assert fp16.keys() == source.keys() and all(torch.equal(fp16[n], source[n].to(torch.float16)) for n in source)
    index = json.loads((tmp_path / "fp16" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in source.values())
    assert next(load_converted(tmp_path / "fp16").parameters()).dtype == torch.float16

    attention = [n for n in source if ".attn.to_" in n]
    layers_file = tmp_path / "clear_local_3.safetensors"
    new = {n: torch.randn(source[n].shape).to(torch.float32) for n in attention}
    write_file(layers_file, [(n, t.dtype, tuple(t.shape)) for n, t in new.items()], new.__getitem__)
    convert(str(bf16_folder), tmp_path / "layered", None, clear_layers=layers_file, progress=False)
    layered = tensors_of(tmp_path / "layered")
    assert all(torch.equal(layered[n], new[n].to(torch.bfloat16)) for n in attention)
    assert all(torch.equal(layered[n], source[n]) for n in source if n not in new)
    meta = json.loads((tmp_path / "layered" / "clear_config.json").read_text())
    assert meta["config"]["radius"] == 3 and meta["training"]["file"] == layers_file.name

    convert(str(bf16_folder), tmp_path / "layers", ClearConfig(radius=3), out_format="layers", progress=False)
    with safe_open(str(tmp_path / "layers" / "clear_layers.safetensors"), "pt") as f:
        stored = {n: f.get_tensor(n) for n in f.keys()}
    assert set(stored) == {n for n in source if any(f".attn.to_{p}" in n for p in ("q", "k", "v", "out.0"))}
    assert all(torch.equal(t, source[n]) for n, t in stored.items())


MEMORY_PROBE = """
import json, sys, tempfile
from pathlib import Path
import torch
from clear_surgery.surgery import ClearConfig
from clear_surgery.surgery.tools.convert import convert

def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

# one tiny conversion first: the imports that happen on first use (tracing, writers) are done
convert("builtin:tiny-flux", Path(tempfile.mkdtemp()) / "warm", ClearConfig(radius=4), progress=False)
growth = {}
for name, kwargs in [("zero-shot", {}), ("fp16", {"dtype": torch.float16}), ("layers", {"out_format": "layers"})]:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak
    before = kib("VmRSS:")
    convert(sys.argv[1], Path(sys.argv[2]) / name, ClearConfig(radius=4), progress=False, **kwargs)
    growth[name] = kib("VmHWM:") - before
print(json.dumps(growth))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_converting_a_200mb_model_does_not_load_it(tmp_path):
    source = write_random_checkpoint(tmp_path / "mid-flux", MID_FLUX, shards=3, progress=False)
    size = sum(p.stat().st_size for p in weight_files(source))
    assert 190e6 < size < 230e6
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(source), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.splitlines()[-1])
    for name, grown in growth.items():  # loading the model would add at least its size
        assert grown < 0.5 * size, (name, grown, size)


def _mismatched(folder: Path) -> None:
    path = weight_files(folder)[0]
    header = read_header(path)
    name = next(iter(header.tensors))
    tensors = {n: read_tensor(header, n) for n in header.tensors}
    tensors[name] = torch.zeros(3, 3, dtype=tensors[name].dtype)
    write_file(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], tensors.__getitem__)


def _truncated(folder: Path) -> None:
    path = weight_files(folder)[-1]
    path.write_bytes(path.read_bytes()[:-100])


def _damaged_header(folder: Path) -> None:
    path = weight_files(folder)[1]
    data = bytearray(path.read_bytes())
    data[12:20] = b"\x00\xff\x00\xff\x00\xff\x00\xff"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (_truncated, "truncated"),
    (_damaged_header, "damaged safetensors header"),
    (_mismatched, "do not match FluxTransformer2DModel built from its config.json"),
])
def test_a_damaged_folder_fails_with_one_message_and_no_output(bf16_folder, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(bf16_folder, folder)
    damage(folder)
    code, errors, output = run("convert", "--model", folder, "--radius", "3", "--out", tmp_path / "out")
    assert code == 2 and len(errors) == 1 and message in output, output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no output, no temporary folder


def test_a_full_disk_fails_with_one_message_and_no_output(bf16_folder, tmp_path, monkeypatch):
    from clear_surgery.hub import streaming

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "write_file", full_disk)
    code, errors, output = run("convert", "--model", bf16_folder, "--radius", "3", "--dtype", "fp16",
                               "--out", tmp_path / "out")
    assert code == 2 and errors == ["error: No space left on device"], output
    assert list(tmp_path.iterdir()) == []


def test_a_refused_rewrite_stops_the_writes_and_leaves_nothing(bf16_folder, tmp_path):
    """The weights are written while the analysis traces; when the rewrite is refused, nothing stays."""
    code, errors, output = run("convert", "--model", bf16_folder, "--radius", "3", "--exclude", "*", "--no-link",
                               "--out", tmp_path / "out")
    assert code == 2 and len(errors) == 1 and "leave no attention site" in errors[0], output
    assert list(tmp_path.iterdir()) == []


def test_layers_format_with_imported_layers_keeps_the_stored_dtype(bf16_folder, tmp_path):
    """--format layers with --clear-layers: the imported tensors (fp32 here) are written in the model's dtype."""
    source = tensors_of(bf16_folder)
    attention = [n for n in source if ".attn.to_q." in n]
    new = {n: torch.randn(source[n].shape) for n in attention}
    layers_file = tmp_path / "clear_local_3.safetensors"
    write_file(layers_file, [(n, t.dtype, tuple(t.shape)) for n, t in new.items()], new.__getitem__)
    convert(str(bf16_folder), tmp_path / "layers", None, clear_layers=layers_file, out_format="layers",
            progress=False)
    with safe_open(str(tmp_path / "layers" / "clear_layers.safetensors"), "pt") as f:
        stored = {n: f.get_tensor(n) for n in f.keys()}
    assert all(torch.equal(stored[n], new[n].to(torch.bfloat16)) for n in attention)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
