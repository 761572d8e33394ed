import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
from clear_surgery.surgery import ClearConfig, analyze, apply_clear, example_inputs, get_clear_state, load_builtin
from clear_surgery.hub import ClearFolderError, load_converted, save_converted
from clear_surgery.hub import checkpoint as checkpoint_module
from conftest import LOADED_TOLERANCE, digest, model_call, rel_err


def _converted(name="tiny-flux", radius=2.5, dtype=None):
    model = load_builtin(name, dtype)
    apply_clear(model, ClearConfig(radius=radius))
    return model


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sd3-controlnet"])
def test_round_trip_is_bit_identical(tmp_path, name):
    model = _converted(name)
    save_converted(model, tmp_path / "out", base_model={"id": f"builtin:{name}"})
    loaded = load_converted(tmp_path / "out")
    assert type(loaded) is type(model)
    assert get_clear_state(loaded).config == get_clear_state(model).config and get_clear_state(loaded).sites == get_clear_state(model).sites
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]) for k in sd)
    inputs = example_inputs(model, text_len=5, grid=(4, 7))
    assert rel_err(model_call(loaded, inputs), model_call(model, inputs)) < LOADED_TOLERANCE
    assert [s.op for s in analyze(loaded).joint_sites] == ["clear"] * len(get_clear_state(model).sites)


def test_bf16_round_trip_and_sharding(tmp_path):
    model = _converted(dtype=torch.bfloat16)
    save_converted(model, tmp_path / "out", max_shard_size=200_000)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 4
    loaded = load_converted(tmp_path / "out")
    assert all(torch.equal(a, b) and b.dtype == torch.bfloat16
               for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # a stock diffusers load of the same folder gives the same (dense) model weights
    stock = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), stock.state_dict().values()))


def test_converting_twice_gives_the_same_bytes(tmp_path):
    save_converted(_converted(), tmp_path / "a")
    save_converted(_converted(), tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_clear_config_contents(tmp_path):
    save_converted(_converted(radius=3), tmp_path / "out", base_model={"id": "builtin:tiny-flux", "revision": None})
    meta = json.loads((tmp_path / "out" / "clear_config.json").read_text())
    assert meta["config"]["radius"] == 3 and meta["config"]["version"] == 2 and "backend" not in meta["config"]
    assert meta["base_model"]["id"] == "builtin:tiny-flux"
    assert len(meta["sites"]) == 4 and meta["analysis"]["model_class"] == "FluxTransformer2DModel"


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(_converted(), out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="holds files clear-surgery did not write"):  # never the user's files
        save_converted(_converted(), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    save_converted(_converted(), out, overwrite=True)  # an empty folder
    save_converted(_converted(), out, overwrite=True)  # one it wrote
    assert (out / "clear_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    real_write = checkpoint_module.write_file

    def failing_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_file", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_converted(_converted(), tmp_path / "out", max_shard_size=200_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_interrupted_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    save_converted(_converted(radius=2), tmp_path / "out")
    before = digest(tmp_path / "out")
    monkeypatch.setattr(checkpoint_module, "write_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_converted(_converted(radius=5), tmp_path / "out", overwrite=True)
    assert digest(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_folder_whose_tensors_do_not_match(tmp_path):
    save_converted(_converted(), tmp_path / "out")
    weights = tmp_path / "out" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["x_embedder.weight"] = torch.zeros(3, 3)
    del tensors["proj_out.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ClearFolderError) as err:
        load_converted(tmp_path / "out")
    message = str(err.value)
    assert "missing: proj_out.bias" in message
    assert "unexpected: extra.weight" in message
    assert "shape of x_embedder.weight: expected [32, 16], found [3, 3]" in message


def test_folder_without_clear_config(tmp_path):
    load_builtin("tiny-flux").save_pretrained(tmp_path / "plain")
    with pytest.raises(ClearFolderError, match="not a CLEAR folder"):
        load_converted(tmp_path / "plain")


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CLEAR attention"):
        save_converted(load_builtin("tiny-flux"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
