import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clear_surgery.hub import (ClearLayersError, load_clear_layers, load_converted, render_model_card,
                               save_clear_layers, save_converted)
from clear_surgery.surgery import ClearConfig, apply_clear, example_inputs, get_clear_state, load_builtin
from clear_surgery.surgery.cli import app
from conftest import cache_repo, cli_exe, digest, model_call
from hub_server import FakeHub

TOKEN = "hf_clearSurgeryTestToken0123456789"


def _trained(name="tiny-flux", radius=3, seed=5):
    """A converted tiny model whose attention projections moved (as after CLEAR training)."""
    model = load_builtin(name)
    apply_clear(model, ClearConfig(radius=radius))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if any(f".attn.{p}." in key for p in ("to_q", "to_k", "to_v", "to_out")):
                value.add_(torch.randn(value.shape, generator=gen) * 0.05)
    return model


def test_clear_layers_round_trip_is_bit_exact(tmp_path):
    model = _trained()
    save_clear_layers(model, tmp_path / "layers", base_model={"id": "builtin:tiny-flux"})
    meta = json.loads((tmp_path / "layers" / "clear_config.json").read_text())
    assert all(".attn.to_" in n and "to_add_out" not in n for n in meta["tensors"])
    assert len(meta["tensors"]) == 2 * (4 * 2 + 3 * 2)  # weight+bias of q,k,v,out (double) and q,k,v (single)
    base = load_builtin("tiny-flux")
    load_clear_layers(base, tmp_path / "layers")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    inputs = example_inputs(model, text_len=4, grid=(4, 5))
    assert torch.equal(model_call(base, inputs), model_call(model, inputs))


def test_clear_layers_transfer_changes_exactly_those_tensors(tmp_path):
    save_clear_layers(_trained("tiny-flux"), tmp_path / "layers")  # "dev"
    schnell = load_builtin("tiny-flux-schnell")  # same blocks, different embedder (no guidance)
    before = {k: v.clone() for k, v in schnell.state_dict().items()}
    load_clear_layers(schnell, tmp_path / "layers")
    changed = {k for k, v in schnell.state_dict().items() if not torch.equal(v, before[k])}
    stored = set(json.loads((tmp_path / "layers" / "clear_config.json").read_text())["tensors"])
    assert changed == stored
    assert get_clear_state(schnell).config.radius == 3


def test_clear_layers_on_another_architecture_list_the_mismatches(tmp_path):
    save_clear_layers(_trained("tiny-flux"), tmp_path / "layers")
    sd3 = load_builtin("tiny-sd3")
    before = {k: v.clone() for k, v in sd3.state_dict().items()}
    with pytest.raises(ClearLayersError) as err:
        load_clear_layers(sd3, tmp_path / "layers")
    message = str(err.value)
    assert "do not fit SD3Transformer2DModel" in message
    assert "unexpected: single_transformer_blocks.0.attn.to_q.weight [32, 32]" in message
    assert "shape of transformer_blocks.0.attn.to_q.weight: expected [32, 32], found [32, 32]" not in message
    assert all(torch.equal(v, before[k]) for k, v in sd3.state_dict().items())
    assert get_clear_state(sd3) is None


def test_official_release_import_and_a_malformed_down_file_refused(tmp_path):
    model = _trained("tiny-flux", radius=16)
    official = {k: v for k, v in model.state_dict().items() if any(f".attn.{p}." in k for p in ("to_q", "to_k", "to_v"))}
    save_file(official, tmp_path / "clear_local_16.safetensors")
    save_file({**official, "transformer_blocks.0.attn.spatial_weight": torch.ones(4)},
              tmp_path / "clear_local_16_down_4.safetensors")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--model", "builtin:tiny-flux", "--clear-layers",
                                 str(tmp_path / "clear_local_16.safetensors"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    loaded = load_converted(tmp_path / "out")
    assert get_clear_state(loaded).config.radius == 16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in official.items())
    result = runner.invoke(app, ["convert", "--model", "builtin:tiny-flux", "--clear-layers",
                                 str(tmp_path / "clear_local_16_down_4.safetensors"), "--out", str(tmp_path / "out2")])
    # spatial_weight not where the official files keep it (<attention>.processor.spatial_weight): refused whole
    assert result.exit_code == 2 and "do not fit" in result.output and "attn.spatial_weight" in result.output
    assert not (tmp_path / "out2").exists()


def test_convert_layers_format_from_cli(tmp_path):
    result = CliRunner().invoke(app, ["convert", "--model", "builtin:tiny-sd3", "--radius", "2", "--format", "layers",
                                      "--out", str(tmp_path / "layers")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["README.md", "clear_config.json",
                                                                        "clear_layers.safetensors"]


def test_model_card_parses_and_carries_metadata(tmp_path, monkeypatch):
    """A local save takes the base model's license from the Hugging Face cache and never opens a socket."""
    import socket

    from huggingface_hub import ModelCard, ModelCardData, constants

    from clear_surgery.hub import model_card

    model = _trained()
    base_card = tmp_path / "base"
    base_card.mkdir()
    (base_card / "README.md").write_text(str(ModelCard.from_template(ModelCardData(license="other"))))
    cache_repo(tmp_path / "hf-cache", "black-forest-labs/FLUX.1-dev", base_card)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, as a user's machine is
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = []
    with monkeypatch.context() as patch:  # no network for a local save
        def no_network(*args, **kwargs):
            attempts.append(args)
            raise OSError(101, "Network is unreachable")

        patch.setattr(socket.socket, "connect", no_network)
        patch.setattr(socket, "create_connection", no_network)
        save_converted(model, tmp_path / "full", base_model={"id": "black-forest-labs/FLUX.1-dev",
                                                              "revision": "a" * 40, "subfolder": "transformer"})
        save_clear_layers(model, tmp_path / "layers", base_model={"id": "black-forest-labs/FLUX.1-dev"})
        meta = json.loads((tmp_path / "full" / "clear_config.json").read_text())
        assert render_model_card(meta) == (tmp_path / "full" / "README.md").read_text()  # generated, reproducible
        assert model_card.base_model_license("someone/not-cached") is None  # not cached: no license
    assert attempts == []
    for folder, relation in (("full", "finetune"), ("layers", "adapter")):
        card = ModelCard.load(tmp_path / folder / "README.md")
        data = card.data.to_dict()
        assert data["base_model"] == "black-forest-labs/FLUX.1-dev" and data["base_model_relation"] == relation
        assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
        assert {"clear", "linear-attention"} <= set(data["tags"]) and data["license"] == "other"
        assert "r = 3" in card.text and "```python" in card.text
    assert model_card.base_model_license("builtin:tiny-flux") is None


def _push(hub_url, *args):
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    exe = cli_exe()
    return subprocess.run([exe, "push-to-hub", *args], capture_output=True, text=True, env=env, timeout=300)


def test_push_to_hub_uploads_the_folder_through_huggingface_hub(tmp_path):
    save_converted(_trained(), tmp_path / "full", base_model={"id": "builtin:tiny-flux"})
    before = digest(tmp_path / "full")
    with FakeHub() as hub:
        done = _push(hub.url, str(tmp_path / "full"), "--repo-id", "me/tiny-clear", "--revision", "v1")
        assert done.returncode == 0, done.stderr
        received = hub.files["me/tiny-clear@v1"]
        assert hub.branches == ["v1"] and set(hub.authorization) == {f"Bearer {TOKEN}"}
    local = {p.name: p.read_bytes() for p in (tmp_path / "full").iterdir()}
    assert set(received) == set(local)
    for name, content in local.items():
        expected = content.replace(b"REPO_ID", b"me/tiny-clear") if name == "README.md" else content
        assert received[name] == expected, name
    assert b'load_model("me/tiny-clear")' in received["README.md"]
    assert digest(tmp_path / "full") == before
    assert TOKEN not in done.stdout + done.stderr
    assert all(TOKEN.encode() not in p.read_bytes() for p in (tmp_path / "full").iterdir())


def test_push_leaves_the_local_base_models_absolute_path_behind(tmp_path):
    """A folder made from a local base records that base relative to itself and, as a hint, its absolute path;
    the upload keeps the record but not the path of the machine it was made on."""
    base = tmp_path / "my-models" / "flux"
    save_clear_layers(_trained(), tmp_path / "layers",
                      base_model={"id": str(base), "model_class": "FluxTransformer2DModel"})
    local = json.loads((tmp_path / "layers" / "clear_config.json").read_text())
    assert local["base_model"]["absolute_hint"] == str(base)  # the folder itself keeps it
    with FakeHub() as hub:
        done = _push(hub.url, str(tmp_path / "layers"), "--repo-id", "me/tiny-layers")
        assert done.returncode == 0, done.stderr
        received = hub.files["me/tiny-layers@main"]
    assert all(str(tmp_path).encode() not in content for content in received.values())
    sent = json.loads(received["clear_config.json"])
    assert sent == {**local, "base_model": {k: v for k, v in local["base_model"].items() if k != "absolute_hint"}}


def test_large_folder_upload_sends_the_card_for_the_repo(tmp_path, monkeypatch):
    """Above the large-upload threshold the weights go through huggingface_hub's folder upload and the
    card, rendered for the repo (not the folder's REPO_ID placeholder), in a commit of its own."""
    import huggingface_hub.constants

    from clear_surgery.hub import push

    model = _trained()
    save_converted(model, tmp_path / "full", base_model={"id": "black-forest-labs/FLUX.1-dev",
                                                         "subfolder": "transformer"})
    assert b'load_converted("REPO_ID")' in (tmp_path / "full" / "README.md").read_bytes()
    monkeypatch.setattr(push, "LARGE_FOLDER_BYTES", 0)
    monkeypatch.setattr("clear_surgery.hub.model_card.base_model_license", lambda base, online=False: None)  # no license lookup
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push.push_to_hub(tmp_path / "full", "me/big-clear", token=TOKEN)
        received = hub.files["me/big-clear@main"]
    assert set(received) == {p.name for p in (tmp_path / "full").iterdir()}
    assert b'load_converted("me/big-clear")' in received["README.md"] and b"REPO_ID" not in received["README.md"]
    weights = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    assert received[weights.name] == weights.read_bytes()


def test_failed_upload_leaves_the_folder_untouched_and_hides_the_token(tmp_path):
    save_clear_layers(_trained(), tmp_path / "layers")
    before = digest(tmp_path / "layers")
    with FakeHub() as hub:
        hub.fail_commit = True
        done = _push(hub.url, str(tmp_path / "layers"), "--repo-id", "me/tiny-layers")
    assert done.returncode == 2 and "error:" in done.stderr
    assert digest(tmp_path / "layers") == before
    assert TOKEN not in done.stdout + done.stderr


def test_push_dry_run_and_validation(tmp_path):
    save_clear_layers(_trained(), tmp_path / "layers")
    result = CliRunner().invoke(app, ["push-to-hub", str(tmp_path / "layers"), "--repo-id", "me/x", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "clear_layers.safetensors" in result.output and "3 files" in result.output
    assert "dry run: nothing uploaded" in result.output
    (tmp_path / "layers" / "README.md").unlink()
    result = CliRunner().invoke(app, ["push-to-hub", str(tmp_path / "layers"), "--repo-id", "me/x", "--dry-run"])
    assert result.exit_code == 2 and "has no model card" in result.output
    (tmp_path / "plain").mkdir()
    result = CliRunner().invoke(app, ["push-to-hub", str(tmp_path / "plain"), "--repo-id", "me/x", "--dry-run"])
    assert result.exit_code == 2 and "is not a model folder" in result.output


def test_hub_ids_load_from_the_cache_offline(tmp_path):
    model = _trained()
    save_converted(model, tmp_path / "full", base_model={"id": "builtin:tiny-flux"})
    save_clear_layers(model, tmp_path / "layers", base_model={"id": "builtin:tiny-flux"})
    cache_repo(tmp_path / "hf" / "hub", "me/tiny-full", tmp_path / "full")
    cache_repo(tmp_path / "hf" / "hub", "me/tiny-layers", tmp_path / "layers")
    cache_repo(tmp_path / "hf" / "hub", "someone/clear-release", tmp_path / "layers")
    os.rename(tmp_path / "hf/hub/models--someone--clear-release/snapshots" / ("c" * 40) / "clear_layers.safetensors",
              tmp_path / "hf/hub/models--someone--clear-release/snapshots" / ("c" * 40) / "clear_local_3.safetensors")
    script = """
import torch
from clear_surgery.hub import load_converted, load_clear_layers, resolve_file
from clear_surgery.surgery import get_clear_state, load_builtin
full = load_converted("me/tiny-full")
layers = load_clear_layers(load_builtin("tiny-flux"), "me/tiny-layers")
ok = all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), layers.state_dict().values()))
path = resolve_file("someone/clear-release/clear_local_3.safetensors")
print("OK" if ok and path.name == "clear_local_3.safetensors" else "MISMATCH", get_clear_state(full).config.radius)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OK", "3"]
    result = subprocess.run([cli_exe(),
                             "analyze", "--model", "me/tiny-full"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "single_transformer_blocks.1.attn" in result.stdout, result.stderr[-2000:]


def test_push_validation_reads_headers_not_weights(tmp_path, monkeypatch):
    """A converted folder is validated from its configs and safetensors headers: no model is built
    from its weights, yet a tensor that does not fit the model class is found."""
    import diffusers

    from clear_surgery.hub.push import validate_folder

    save_converted(_trained(), tmp_path / "full", base_model={"id": "builtin:tiny-flux"})

    def no_loading(*args, **kwargs):
        raise AssertionError("validation loaded the model")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_loading)
    assert validate_folder(tmp_path / "full").kind == "converted model"
    weights = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.bias"] = torch.zeros(3)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape of proj_out.bias: expected \[16\], found \[3\]"):
        validate_folder(tmp_path / "full")
