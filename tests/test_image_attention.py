"""image_attention='local': image-only self-attention sites (SD3.5's attn2) become CLEAR with no text
segment; the default leaves them dense, as the paper does."""

import json

import pytest
import torch

from clear_surgery.surgery import ClearConfig, apply_clear, example_inputs, get_clear_state, load_builtin, remove_clear
from conftest import perturbed, rel_err

ATTN2 = "transformer_blocks.0.attn2"


def _sd35():
    model = perturbed(load_builtin("tiny-sd35"))
    torch.manual_seed(0)
    return model, example_inputs(model, grid=(6, 5), batch=2)


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_local_converts_the_image_only_site_and_equals_stock_at_a_covering_radius():
    model, inputs = _sd35()
    stock = _out(model, inputs)
    apply_clear(model, ClearConfig(radius=2))
    assert ATTN2 not in get_clear_state(model).sites  # the default: dense, as the paper
    joint_only = _out(model, inputs)
    remove_clear(model)
    report = apply_clear(model, ClearConfig(radius=1000, image_attention="local"))  # re-traced and verified
    assert ATTN2 in get_clear_state(model).sites and {s.module: s.op for s in report.sites}[ATTN2] == "clear"
    assert rel_err(_out(model, inputs), stock) < 1e-6
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=2, image_attention="local"))
    local = _out(model, inputs)
    assert rel_err(local, joint_only) > 1e-3  # the image-only site's window does mask
    remove_clear(model)
    assert torch.equal(_out(model, inputs), stock)


@pytest.mark.parametrize("radius", [1.5, 3.0])
def test_the_image_only_site_equals_an_independent_window_mask(radius):
    """attn2 alone, CLEAR (generic route, text length 0) against the stock processor whose SDPA call is given a
    window mask built here from grid coordinates."""
    model, _ = _sd35()
    attn = model.get_submodule(ATTN2)
    hidden = torch.randn(2, 30, attn.query_dim if hasattr(attn, "query_dim") else attn.to_q.in_features)
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij")
    y, x = rows.flatten(), cols.flatten()
    window = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 < radius * radius

    class Masked(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.nn.functional.scaled_dot_product_attention:
                kwargs["attn_mask"] = window
            return func(*args, **kwargs)

    with torch.no_grad(), Masked():
        want = attn(hidden)
    apply_clear(model, ClearConfig(radius=radius, image_attention="local"))
    get_clear_state(model).runtime.grid = (6, 5)  # what the model's forward sets for each call
    with torch.no_grad():
        got = attn(hidden)
    assert rel_err(got, want) < 1e-5


def test_local_image_attention_with_the_tile_layout_and_per_layer_radii():
    model, inputs = _sd35()
    config = dict(radius=1.5, image_attention="local", radius_overrides={"*.attn2": 2.5})
    apply_clear(model, ClearConfig(**config))
    assert model.get_submodule(ATTN2).processor.radius == 2.5
    raster = _out(model, inputs)
    remove_clear(model)
    apply_clear(model, ClearConfig(**config, token_layout="tiled", tile_shape=[2, 5]))
    assert rel_err(_out(model, inputs), raster) < 1e-5


def test_saved_and_loaded_with_its_setting(tmp_path):
    from clear_surgery.hub import load_converted, save_converted

    model, inputs = _sd35()
    apply_clear(model, ClearConfig(radius=2, image_attention="local"))
    save_converted(model, tmp_path / "local", base_model={"id": "builtin:tiny-sd35"})
    meta = json.loads((tmp_path / "local" / "clear_config.json").read_text())
    assert meta["config"]["image_attention"] == "local" and ATTN2 in meta["sites"]
    loaded = load_converted(tmp_path / "local")
    assert get_clear_state(loaded).sites == get_clear_state(model).sites
    assert rel_err(_out(loaded, inputs), _out(model, inputs)) < 1e-6
    plain = ClearConfig(radius=2).to_dict()  # the default is left out: earlier releases read the folder
    assert "image_attention" not in plain and ClearConfig.from_dict(plain).image_attention == "dense"


def test_what_local_image_attention_cannot_do_yet_is_refused(tmp_path):
    from clear_surgery.export.common import check_exportable
    from clear_surgery.surgery import enable_patch_parallel

    model, _ = _sd35()
    apply_clear(model, ClearConfig(radius=2, image_attention="local"))
    with pytest.raises(ValueError, match="image_attention='local'"):
        enable_patch_parallel(model)
    sizes = {"min": "64x64", "opt": "64x64", "max": "64x64"}
    with pytest.raises(ValueError, match="image-only CLEAR attention"):
        check_exportable("this model", "SD3Transformer2DModel", get_clear_state(model).config.to_dict(), sizes)
    with pytest.raises(ValueError, match="image_attention .* must be one of dense, local"):
        ClearConfig(radius=2, image_attention="everywhere")


def test_cli_convert_and_profile_with_local_image_attention(tmp_path):
    from clear_surgery.surgery.cli import main

    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "clear_surgery.surgery.cli", "convert", "--model",
                           "builtin:tiny-sd35", "--radius", "2", "--image-attention", "local", "--out",
                           str(tmp_path / "c")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "converted 2 joint attention sites and 1 image-only one to CLEAR (r=2)" in done.stdout
    assert main(["profile", "--model", "builtin:tiny-sd35", "--image-attention", "local", "--resolution", "64",
                 "--steps", "1", "--radii", "2,8", "--out", str(tmp_path / "p")]) == 0
    found = json.loads((tmp_path / "p" / "locality.json").read_text())
    assert found["text_share"][ATTN2] == [0.0] * len(found["text_share"][ATTN2])  # no text: the window alone
    assert ATTN2 in found["recommended_radius_per_layer"]
