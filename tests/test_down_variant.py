"""The official pooled-key ("down") variant: image queries also see the image pooled over f x f blocks
(keys and values after RoPE, one learned weight per block position), text queries do not.

Every check compares with an independent transcription of the official math, written here in the
official layout (batch, heads, tokens, dim), with a dense mask from the official predicate."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from safetensors.torch import load_file, save_file

from clear_surgery.plugins import attention
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state
from clear_surgery.surgery.core.builtin import load_builtin
from clear_surgery.surgery.core.families.flux import example_inputs
from conftest import model_call, rel_err


def official_down_attention(q, k, v, text_len, text_first, height, width, radius, factor, spatial_weight):
    """q, k, v (batch, heads, tokens, dim): the official LocalDownsampleFlexAttnProcessor's attention
    (pooled keys appended after the joint sequence), its mask predicate on index grids as the official
    mask_mod evaluates it (here for text first or last)."""
    n = q.shape[2]
    image_start = text_len if text_first else 0
    image = slice(image_start, image_start + height * width)

    def pooled(t):
        return (t[:, :, image].unflatten(2, (height // factor, factor, width // factor, factor))
                * spatial_weight).sum(dim=(3, 5)).flatten(2, 3)

    keys, values = torch.cat([k, pooled(k)], 2), torch.cat([v, pooled(v)], 2)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(keys.shape[2])[None, :]
    q_image = (q_idx >= image.start) & (q_idx < image.stop)
    kv_image = (kv_idx >= image.start) & (kv_idx < image.stop)
    q_y, q_x = (q_idx - image.start) // width, (q_idx - image.start) % width
    kv_y, kv_x = (kv_idx - image.start) // width, (kv_idx - image.start) % width
    window = (q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < radius**2
    mask = torch.where(kv_idx >= n, q_image,  # pooled keys: image queries only
                       ~q_image | ~kv_image | window)  # text queries see the joint sequence; every query the text
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


# (batch, heads, dim, text_len, text_first, height, width, radius, factor)
CASES = [
    (2, 2, 16, 5, True, 8, 12, 2.5, 4),  # batch > 1, non-square grid
    (1, 3, 16, 7, False, 6, 4, 1.5, 2),  # text last
    (2, 1, 32, 0, True, 9, 6, 3, 3),  # no text
    (1, 2, 16, 4, True, 4, 8, 50, 4),  # r beyond the grid
]


def _weights(factor, seed):
    return (torch.rand(1, 1, 1, factor, 1, factor, 1, generator=torch.Generator().manual_seed(seed)) + 0.5) / factor**2


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_op_equals_the_official_math_forward_and_backward(case, backend):
    b, h, d, text_len, text_first, height, width, radius, factor = case
    gen = torch.Generator().manual_seed(sum(case[:7]))
    n = text_len + height * width
    leaves = [torch.randn(b, n, h, d, generator=gen, requires_grad=True) for _ in range(3)]
    weight = _weights(factor, 1).requires_grad_(True)
    out = attention(*leaves, text_len=text_len, text_first=text_first, height=height, width=width, radius=radius,
                    pool_weight=weight, backend=backend)
    truth_leaves = [t.detach().double().transpose(1, 2).requires_grad_(True) for t in leaves]
    truth_weight = weight.detach().double().requires_grad_(True)
    truth = official_down_attention(*truth_leaves, text_len, text_first, height, width, radius, factor,
                                    truth_weight).transpose(1, 2)
    assert rel_err(out, truth) < 1e-5
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, [*leaves, weight], grad)
    want = torch.autograd.grad(truth, [*truth_leaves, truth_weight], grad.double())
    for name, g, w in zip(("dq", "dk", "dv", "dspatial_weight"), got, want):
        w = w.transpose(1, 2) if w.dim() == 4 else w
        assert rel_err(g, w) < 1e-5, name


def test_text_queries_ignore_the_pooled_keys_and_image_queries_do_not():
    q, k, v = (torch.randn(1, 3 + 16, 2, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    args = dict(text_len=3, text_first=True, height=4, width=4, radius=1.5, backend="reference")
    plain = attention(q, k, v, **args)
    down = attention(q, k, v, pool_weight=torch.full((2, 2), 0.25), **args)
    assert rel_err(down[:, :3], plain[:, :3]) < 1e-6
    assert rel_err(down[:, 3:], plain[:, 3:]) > 1e-2


def test_tile_layout_gives_the_raster_result():
    from clear_surgery.plugins.layout import tile_inverse_permutation, tile_permutation

    height, width, tile, text_len = 8, 12, (4, 8), 5
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, text_len + height * width, 2, 16, generator=gen) for _ in range(3))
    weight = _weights(4, 2)
    raster = attention(q, k, v, text_len=text_len, text_first=True, height=height, width=width, radius=3,
                       pool_weight=weight, backend="reference")
    perm = tile_permutation(height, width, tile)

    def tiled(t):
        return torch.cat([t[:, :text_len], t[:, text_len:][:, perm]], 1)

    out = attention(*map(tiled, (q, k, v)), text_len=text_len, text_first=True, height=height, width=width,
                    radius=3, pool_weight=weight, tile=tile, backend="flex")
    back = torch.cat([out[:, :text_len], out[:, text_len:][:, tile_inverse_permutation(height, width, tile)]], 1)
    assert rel_err(back, raster) < 1e-5


class OfficialDownProcessor(torch.nn.Module):
    """The official LocalDownsampleFlexAttnProcessor's steps on a diffusers FluxAttention, the
    attention from ``official_down_attention`` (text first, the grid given)."""

    def __init__(self, grid, radius, factor, weight):
        super().__init__()
        self.grid, self.radius, self.factor = grid, radius, factor
        self.spatial_weight = torch.nn.Parameter(weight.clone())

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b = hidden_states.shape[0]

        def heads(x):
            return x.view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            query, key = torch.cat([eq, query], 2), torch.cat([ek, key], 2)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], 2)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=2)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=2)
        text_len = query.shape[2] - self.grid[0] * self.grid[1]
        out = official_down_attention(query, key, value, text_len, True, *self.grid, self.radius, self.factor,
                                      self.spatial_weight)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * attn.head_dim).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def _official_file(model, path, factor, seed=3):
    """A file as the official release names and shapes its tensors: q/k/v/out projections of every block
    (changed a little) and each attention's processor.spatial_weight."""
    gen = torch.Generator().manual_seed(seed)
    cfg, state, tensors = model.config, model.state_dict(), {}
    blocks = [(f"transformer_blocks.{i}.attn", ("to_q", "to_k", "to_v", "to_out.0")) for i in range(cfg.num_layers)]
    blocks += [(f"single_transformer_blocks.{i}.attn", ("to_q", "to_k", "to_v")) for i in range(cfg.num_single_layers)]
    for site, projections in blocks:
        for projection in projections:
            for kind in ("weight", "bias"):
                name = f"{site}.{projection}.{kind}"
                tensors[name] = state[name] + 0.05 * torch.randn(state[name].shape, generator=gen)
        tensors[f"{site}.processor.spatial_weight"] = _weights(factor, seed + len(tensors))
    save_file(tensors, path)
    return tensors


def test_converted_flux_equals_the_official_processor_on_every_block():
    model = load_builtin("tiny-flux").double()
    weights = {}
    official = load_builtin("tiny-flux").double()
    apply_clear(model, ClearConfig(radius=2.5, down_factor=2))
    for name in get_clear_state(model).sites:
        weights[name] = _weights(2, len(weights)).double()
        model.get_submodule(name).processor.spatial_weight.data.copy_(weights[name])
        official.get_submodule(name).set_processor(OfficialDownProcessor((4, 6), 2.5, 2, weights[name]))
    inputs = example_inputs(model, 5, 4, 6, 2, torch.float64, "cpu")
    assert rel_err(model_call(model, inputs), model_call(official, inputs)) < 1e-10
    # and the pooled keys matter: plain CLEAR differs
    plain = load_builtin("tiny-flux").double()
    apply_clear(plain, ClearConfig(radius=2.5))
    assert rel_err(model_call(plain, inputs), model_call(official, inputs)) > 1e-4


def test_official_down_file_converts_and_loads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clear_surgery.hub import load_converted
    from clear_surgery.surgery.cli import app

    monkeypatch.chdir(tmp_path)
    file = tmp_path / "clear_local_8_down_4.safetensors"
    tensors = _official_file(load_builtin("tiny-flux"), file, 4)
    run = CliRunner().invoke(app, ["convert", "--model", "builtin:tiny-flux", "--clear-layers", str(file),
                                   "--out", "converted"])
    assert run.exit_code == 0, run.output
    assert "r=8, pooled keys 4x4" in run.output
    loaded = load_converted(tmp_path / "converted")
    config = get_clear_state(loaded).config
    assert (config.radius, config.down_factor) == (8, 4)
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    # the stock weights stay stock: diffusers loads the folder's shards without unexpected keys
    stock = load_file(tmp_path / "converted" / "diffusion_pytorch_model.safetensors")
    assert not [n for n in stock if "spatial_weight" in n]
    assert sorted(load_file(tmp_path / "converted" / "clear_tensors.safetensors")) == sorted(
        n for n in tensors if "spatial_weight" in n)
    # what the official notebook does: stock model, its processors, load_state_dict(strict=False)
    by_hand = load_builtin("tiny-flux")
    apply_clear(by_hand, ClearConfig(radius=8, down_factor=4))
    missing, unexpected = by_hand.load_state_dict(tensors, strict=False)
    trained = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", "spatial_weight")  # the notebook's check
    assert not unexpected and not [n for n in missing if any(t in n for t in trained)]
    inputs = example_inputs(loaded, 6, 8, 12, 2, torch.float32, "cpu")
    assert rel_err(model_call(loaded, inputs), model_call(by_hand, inputs)) < 1e-6


def test_down_file_converts_from_files_and_as_layers(tmp_path):
    """The streamed conversion (a model read from files, never loaded) writes the same tensors."""
    from clear_surgery.hub import load_converted
    from clear_surgery.surgery.tools.convert import convert

    dense = load_builtin("tiny-flux")
    dense.save_pretrained(tmp_path / "dense")
    file = tmp_path / "clear_local_4_down_2.safetensors"
    tensors = _official_file(dense, file, 2, seed=5)
    result = convert(str(tmp_path / "dense"), tmp_path / "full", clear_layers=file, progress=False)
    assert result.streamed
    layers = convert(str(tmp_path / "dense"), tmp_path / "layers", clear_layers=file, out_format="layers")
    assert sorted(load_file(tmp_path / "layers" / "clear_layers.safetensors")) == sorted(tensors)
    again = convert(str(tmp_path / "dense"), tmp_path / "again", clear_layers=tmp_path / "layers", progress=False)
    assert again.streamed and layers.streamed
    for folder in ("full", "again"):
        model = load_converted(tmp_path / folder)
        assert get_clear_state(model).config.down_factor == 2
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in tensors.items()), folder
    # a fresh conversion with --down-factor starts from the official initialisation (the mean)
    convert(str(tmp_path / "dense"), tmp_path / "fresh", ClearConfig(radius=4, down_factor=2), progress=False)
    fresh = load_file(tmp_path / "fresh" / "clear_tensors.safetensors")
    assert len(fresh) == 4 and all(torch.all(t == 0.25) for t in fresh.values())


def test_down_variant_refusals(tmp_path):
    from clear_surgery.hub.clear_layers import ClearLayersError, resolve_layers
    from clear_surgery.surgery.core.errors import InvalidValueError
    from clear_surgery.surgery.tools.convert import convert

    with pytest.raises(InvalidValueError, match="down_factor must be an integer >= 2"):
        ClearConfig(radius=4, down_factor=1)
    model = load_builtin("tiny-flux")
    apply_clear(model, ClearConfig(radius=4, down_factor=4))
    with pytest.raises(ValueError, match="grid 4x6 is not a multiple of 4"):
        model_call(model, example_inputs(model, 5, 4, 6, 1, torch.float32, "cpu"))
    file = tmp_path / "clear_local_8_down_4.safetensors"
    _official_file(load_builtin("tiny-flux"), file, 4)
    with pytest.raises(ClearLayersError, match="made for the 'down' variant with factor 4, not plain CLEAR"):
        convert("builtin:tiny-flux", tmp_path / "out", ClearConfig(radius=8), clear_layers=file)
    bad = tmp_path / "clear_local_8_down.safetensors"
    bad.write_bytes(file.read_bytes())
    with pytest.raises(ClearLayersError, match="cannot read the radius"):
        resolve_layers(bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="pool_weight must hold f x f"):
        attention(*(torch.randn(1, 3 + 16, 1, 16) for _ in range(3)), text_len=3, text_first=True, height=4,
                  width=4, radius=2, pool_weight=torch.ones(3))
    assert math.isclose(float(model.transformer_blocks[0].attn.processor.spatial_weight.sum()), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, 2, 128, 77, True, 24, 32, 5, 4), (1, 3, 64, 40, False, 18, 12, 30, 2)],
                         ids=["text-first", "text-last-r-beyond-grid"])
def test_gpu_backends_equal_the_official_math(case, dtype, backend):
    b, h, d, text_len, text_first, height, width, radius, factor = case
    gen = torch.Generator(device="cuda").manual_seed(11)
    n = text_len + height * width
    leaves = [torch.randn(b, n, h, d, generator=gen, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    weight = _weights(factor, 4).to("cuda", dtype).requires_grad_(True)
    out = attention(*leaves, text_len=text_len, text_first=text_first, height=height, width=width, radius=radius,
                    pool_weight=weight, backend=backend)
    truth_leaves = [t.detach().double().cpu().transpose(1, 2).requires_grad_(True) for t in leaves]
    truth_weight = weight.detach().double().cpu().requires_grad_(True)
    truth = official_down_attention(*truth_leaves, text_len, text_first, height, width, radius, factor,
                                    truth_weight).transpose(1, 2)
    assert rel_err(out.cpu(), truth) < 2e-2
    grad = torch.randn(out.shape, generator=gen, device="cuda", dtype=dtype)
    got = torch.autograd.grad(out, [*leaves, weight], grad)
    want = torch.autograd.grad(truth, [*truth_leaves, truth_weight], grad.double().cpu())
    for name, g, w in zip(("dq", "dk", "dv", "dspatial_weight"), got, want):
        w = w.transpose(1, 2) if w.dim() == 4 else w
        assert rel_err(g.cpu(), w) < 3e-2, name
