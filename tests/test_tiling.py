import pytest
import torch

from clear_surgery.surgery import (ClearConfig, apply_clear, example_inputs, get_clear_state, load_builtin,
                                   remove_clear, tiny_pipeline)
from conftest import model_call, rel_err


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sd35", "tiny-flux-controlnet", "tiny-sd3-controlnet"])
@pytest.mark.parametrize("grid,tile", [((5, 7), [2, 4]), ((6, 8), [3, 4]), ((4, 9), [8, 16])])
def test_tiled_model_equals_raster_model(name, grid, tile):
    model = load_builtin(name)
    inputs = example_inputs(model, text_len=6, grid=grid, batch=2)
    apply_clear(model, ClearConfig(radius=2.5))
    raster = model_call(model, inputs)
    remove_clear(model)
    apply_clear(model, ClearConfig(radius=2.5, token_layout="tiled", tile_shape=tile))
    assert get_clear_state(model).runtime.tile == tuple(tile)
    assert rel_err(model_call(model, inputs), raster) < 1e-6
    remove_clear(model)
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_tiled_model_under_torch_compile_equals_eager(name):
    model = load_builtin(name)
    inputs = example_inputs(model, text_len=6, grid=(6, 8), batch=1)
    apply_clear(model, ClearConfig(radius=2.5, token_layout="tiled", tile_shape=[2, 4]))
    eager = model_call(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    assert rel_err(model_call(compiled, inputs), eager) < 1e-5


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_regional_compilation_shares_one_graph_per_block_class(name):
    """diffusers' compile_repeated_blocks on a converted model: as many graphs as on the stock model (the
    processors' per-layer names must not become guards: past dynamo's recompile limit of 8, FLUX.1-dev's 57
    blocks would silently run eager), and equal to eager."""
    from torch._dynamo.utils import counters

    model = load_builtin(name)
    inputs = example_inputs(model, text_len=6, grid=(6, 8), batch=1)
    graphs = {}
    for converted in (False, True):
        if converted:
            apply_clear(model, ClearConfig(radius=2.5, token_layout="tiled", tile_shape=[2, 4]))
        eager = model_call(model, inputs)
        torch._dynamo.reset()
        counters.clear()
        for block in model.modules():  # compile_repeated_blocks (SD3's model does not declare its blocks)
            if type(block).__name__ in (model._repeated_blocks or ["JointTransformerBlock"]):
                block.compile(backend="eager")
        assert rel_err(model_call(model, inputs), eager) < 1e-6
        graphs[converted] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[True] == graphs[False], graphs


def test_tiled_controlnet_residuals_and_pipeline():
    pipe = tiny_pipeline("tiny-flux-controlnet")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red robot", height=32, width=48, num_inference_steps=2, output_type="pt",
                  max_sequence_length=16, control_image=torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)))
    for model in (pipe.transformer, pipe.controlnet):
        apply_clear(model, ClearConfig(radius=2))
    raster = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    for model in (pipe.transformer, pipe.controlnet):
        remove_clear(model)
        apply_clear(model, ClearConfig(radius=2, token_layout="tiled", tile_shape=[4, 4]))
    tiled = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert rel_err(tiled, raster) < 1e-5


def test_default_tile_follows_head_dim():
    model = load_builtin("tiny-flux")  # head dim 16
    apply_clear(model, ClearConfig(radius=2, token_layout="tiled"))
    assert get_clear_state(model).runtime.tile == (4, 8)


def test_tile_config_is_validated():
    with pytest.raises(ValueError, match=r"token_layout \(--token-layout\) must be"):
        ClearConfig(radius=2, token_layout="zigzag")
    with pytest.raises(ValueError, match="tile_shape needs token_layout='tiled'"):
        ClearConfig(radius=2, tile_shape=[8, 16])
    with pytest.raises(ValueError, match="tile_shape must be two positive ints"):
        ClearConfig(radius=2, token_layout="tiled", tile_shape=[8, 0])
