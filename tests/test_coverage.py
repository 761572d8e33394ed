import re
from pathlib import Path

import pytest
import torch

import clear_surgery.surgery.core.rewrite as rewrite
from clear_surgery.surgery import ClearConfig, apply_clear, example_inputs, get_clear_state, load_builtin, remove_clear
from clear_surgery.surgery import build_tiny_model, tiny_models
from clear_surgery.surgery.tools.coverage import CONVERTS, coverage_rows, coverage_table
from clear_surgery.surgery.core.families import family_for_class, family_of
from clear_surgery.surgery.core.processors import ClearSDPAProcessor
from conftest import LOADED_TOLERANCE, perturbed, rel_err



def family_of_row(label: str):
    """The registered family of a coverage row ("FLUX.2 (Flux2Transformer2DModel)"), or None."""
    return family_for_class(re.search(r"\((\w+)", label).group(1))


# rows a registered family claims: exactly these must convert
CONVERTIBLE = sorted(label for label in tiny_models() if family_of_row(label) is not None)
# ... through the generic route (their stock processor's SDPA call goes to CLEAR)
GENERIC = [label for label in CONVERTIBLE if not family_of_row(label).processors]


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)[0]
    return out if isinstance(out, torch.Tensor) else torch.cat([t.flatten() for t in out])  # Z-Image: a list


def test_readme_table_is_what_coverage_prints():
    rows = coverage_rows()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    published = re.search(r"<!-- coverage-table -->\n(.*?)\n<!-- /coverage-table -->", readme, re.S).group(1)
    assert published == coverage_table(rows)
    supported = {r["family"] for r in rows if r["rewrite"] == CONVERTS}
    # "converts" is decided by converting (re-trace check) and comparing outputs at a radius covering the
    # grid; the built-in ones are tested in tests/test_rewrite.py, the generic ones below
    assert supported == set(CONVERTIBLE)
    assert {"FLUX.1 (FluxTransformer2DModel)", "SD3 (SD3Transformer2DModel)", "FLUX.2 (Flux2Transformer2DModel)",
            "CogView4 (CogView4Transformer2DModel)"} <= supported and len(GENERIC) >= 7
    others = {r["family"]: r["rewrite"] for r in rows if r["family"] not in supported}
    assert all(why.startswith(("cannot: ", "not applicable: ")) for why in others.values())
    # not applicable: attention that never grows with the square of the image (Sana: linear self-attention,
    # cross-attention to the text); everything that cannot convert says why
    assert [f for f, why in others.items() if why.startswith("not applicable")] == ["Sana (SanaTransformer2DModel)"]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sd35"])
def test_generic_route_equals_the_dedicated_processors(name, monkeypatch):
    """Text first (FLUX) and image first (SD3): routing the stock processor's SDPA call gives exactly
    what the dedicated CLEAR processors compute, at a radius that masks."""
    model = load_builtin(name)
    inputs = example_inputs(model, grid=(6, 5), batch=2)
    apply_clear(model, ClearConfig(radius=1.5))
    dedicated = _out(model, inputs)
    remove_clear(model)
    monkeypatch.setattr(rewrite, "clear_processor_for", lambda family, processor: None)
    apply_clear(model, ClearConfig(radius=1.5))
    assert isinstance(model.transformer_blocks[0].attn.processor, ClearSDPAProcessor)
    generic = _out(model, inputs)
    remove_clear(model)
    assert torch.equal(generic, dedicated)
    assert not torch.allclose(generic, _out(model, inputs), atol=1e-3)  # the window does mask


@pytest.mark.parametrize("family", GENERIC)
def test_generic_families_convert_mask_and_tile(family):
    model, *_ = build_tiny_model(family)
    perturbed(model)  # a zero-initialized output layer (ControlNet, Ernie-Image) would hide the attention
    inputs = example_inputs(model, grid=(6, 5))
    dense = _out(model, inputs)
    apply_clear(model, ClearConfig(radius=1.5))  # the re-trace check runs inside
    raster = _out(model, inputs)
    before = get_clear_state(model).analysis  # the next conversions of this model reuse it, unverified again
    remove_clear(model)
    tiled_config = ClearConfig(radius=1.5, token_layout="tiled", tile_shape=[2, 2])
    if family_of(model).tileable:
        apply_clear(model, tiled_config, analysis=before, verify=False)
        tiled = _out(model, inputs)
        remove_clear(model)
    else:  # refused before anything changes
        with pytest.raises(ValueError, match="token_layout='tiled' is not available"):
            apply_clear(model, tiled_config)
        assert get_clear_state(model) is None
        tiled = raster
    apply_clear(model, ClearConfig(radius=100), analysis=before, verify=False)
    wide = _out(model, inputs)
    remove_clear(model)
    assert torch.allclose(wide, dense, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raster, dense, atol=1e-4)
    assert torch.allclose(tiled, raster, rtol=1e-4, atol=1e-5)
    assert torch.equal(_out(model, inputs), dense)  # remove_clear restores the stock processors


def test_generic_family_saves_loads_and_copies(tmp_path):
    import copy

    from clear_surgery.hub import load_converted, save_converted

    model, _ = build_tiny_model("FLUX.2 (Flux2Transformer2DModel)")
    model.eval()
    inputs = example_inputs(model, grid=(6, 5))
    apply_clear(model, ClearConfig(radius=1.5))
    expected = _out(model, inputs)
    save_converted(model, tmp_path / "flux2-clear", base_model={"id": "local/flux2-tiny"})
    loaded = load_converted(tmp_path / "flux2-clear")
    assert isinstance(loaded.transformer_blocks[0].attn.processor, ClearSDPAProcessor)
    assert rel_err(_out(loaded, inputs), expected) < LOADED_TOLERANCE
    assert rel_err(_out(copy.deepcopy(loaded), inputs), expected) < LOADED_TOLERANCE
