"""FP8 linear layers (--quantize fp8): which layers the family rule turns to FP8, the refusals where FP8
cannot run, and the call into torchao's own API. The FP8 run itself needs a GPU with FP8 tensor cores."""

import pytest
import torch

from clear_surgery.surgery import ClearConfig, apply_clear, example_inputs, load_builtin
from clear_surgery.surgery.tools import quantize as q


@pytest.mark.parametrize("name,kept", [
    ("tiny-flux", {"x_embedder", "context_embedder", "norm_out.linear", "proj_out", "transformer_blocks.0.norm1.linear",
                   "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear"}),
    ("tiny-sd35", {"context_embedder", "norm_out.linear", "proj_out", "transformer_blocks.0.norm1.linear",
                   "transformer_blocks.0.norm1_context.linear"}),
    ("tiny-flux-controlnet", {"x_embedder", "controlnet_x_embedder", "controlnet_blocks.0"}),
])
def test_the_family_rule_keeps_embedders_and_the_final_projection(name, kept):
    model = load_builtin(name)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(q.fp8_targets(model))
    assert kept <= linear - targets and not any(n.startswith("time_text_embed.") for n in targets)
    assert {n for n in linear if ".attn.to_q" in n or ".ff.net." in n} <= targets  # the bulk of the FLOPs


def test_fp8_is_refused_where_it_cannot_run(monkeypatch):
    model = load_builtin("tiny-flux")
    with pytest.raises(RuntimeError, match="need a CUDA GPU with FP8 tensor cores"):
        q.quantize_linear_layers(model, "fp8")
    with pytest.raises(ValueError, match="must be one of fp8, got 'int4'"):
        q.check_quantize("--quantize", "int4", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert "A100" in q.fp8_reason("cuda") and "8.0" in q.fp8_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert q.fp8_reason("cuda") is None
    from clear_surgery.surgery import build_tiny_model

    chroma, *_ = build_tiny_model("Chroma (ChromaTransformer2DModel)")
    with pytest.raises(ValueError, match="chroma family has no rule yet"):
        q.fp8_targets(chroma)


def test_fp8_attention_is_refused_off_hopper_and_asked_of_the_clear_models(monkeypatch):
    q.check_fp8_attention("--fp8-attention", False, "cpu")  # not asked: nothing to check
    with pytest.raises(RuntimeError, match="runs on Hopper GPUs .* this runs on cpu"):
        q.check_fp8_attention("--fp8-attention", True, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with pytest.raises(RuntimeError, match="L40S is sm_89"):  # FP8 tensor cores, but no wgmma
        q.check_fp8_attention("--fp8-attention", True, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q.check_fp8_attention("--fp8-attention", True, "cuda")

    from types import SimpleNamespace

    from clear_surgery.surgery import get_clear_state

    dense = SimpleNamespace(transformer=load_builtin("tiny-flux"))
    with pytest.raises(ValueError, match="no CLEAR attention"):
        q.fp8_attention_pipeline(dense)
    apply_clear(dense.transformer, ClearConfig(radius=2))
    assert q.fp8_attention_pipeline(dense) == ["transformer"]
    assert get_clear_state(dense.transformer).runtime.fp8_attention


def test_the_call_into_torchao_selects_exactly_the_targets(monkeypatch):
    """torchao's own quantize_ receives its float8 config with row-wise scales and our filter; on this CPU its
    hardware check then stops it (the run itself is a GPU test)."""
    torchao = pytest.importorskip("torchao.quantization")
    model = load_builtin("tiny-flux")
    seen = {}
    real = torchao.quantize_

    def recording(model_, config, filter_fn=None, **kwargs):
        seen["config"] = config
        seen["chosen"] = sorted(n for n, m in model_.named_modules() if filter_fn(m, n))
        return real(model_, config, filter_fn=filter_fn, **kwargs)

    monkeypatch.setattr(torchao, "quantize_", recording)
    monkeypatch.setattr(q, "fp8_reason", lambda device: None)
    with pytest.raises(AssertionError, match="Float8"):  # torchao: "requires CUDA compute capability >= 8.9 ..."
        q.quantize_linear_layers(model, "fp8")
    assert isinstance(seen["config"], torchao.Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, torchao.PerRow) for g in seen["config"].granularity)  # activations and weights
    assert seen["chosen"] == sorted(q.fp8_targets(model))


def test_fp8_weights_take_the_place_of_the_bf16_ones(monkeypatch):
    """What FP8 does to the weights' memory, checked on this CPU (torchao's hardware check lifted: only the
    conversion runs, no FP8 matmul): each target's bf16 weight becomes e4m3 values (1 byte each) and one float32
    factor per row, and nothing keeps the bf16 tensor alive (a model's resident weights shrink by about half
    of what the targets held)."""
    import gc
    import weakref

    quant_api = pytest.importorskip("torchao.quantization.quant_api")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(q, "fp8_reason", lambda device: None)
    model = load_builtin("tiny-flux", dtype=torch.bfloat16)
    targets = q.fp8_targets(model)
    originals = {name: weakref.ref(model.get_submodule(name).weight) for name in targets}
    shapes = {name: model.get_submodule(name).weight.shape for name in targets}
    assert q.quantize_linear_layers(model, "fp8") == sorted(targets)
    gc.collect()
    assert [name for name, ref in originals.items() if ref() is not None] == []
    for name in targets:
        weight = model.get_submodule(name).weight
        assert weight.qdata.dtype == torch.float8_e4m3fn and weight.qdata.shape == shapes[name]
        assert weight.scale.dtype == torch.float32 and weight.scale.numel() == shapes[name][0]


@pytest.mark.gpu
def test_gpu_fp8_linear_layers_with_clear_tile_layout_and_compile():
    if q.fp8_reason("cuda"):
        pytest.skip(q.fp8_reason("cuda"))
    model = load_builtin("tiny-flux", dtype=torch.bfloat16).cuda()
    apply_clear(model, ClearConfig(radius=2.5, token_layout="tiled"))
    torch.manual_seed(0)
    inputs = example_inputs(model, grid=(8, 12))
    with torch.no_grad():
        bf16 = model(**inputs)[0].float()
        names = q.quantize_linear_layers(model, "fp8")
        fp8 = model(**inputs)[0].float()
        compiled = torch.compile(model)(**inputs)[0].float()
    assert names and type(model.get_submodule(names[0]).weight).__name__ != "Parameter"
    err = ((fp8 - bf16).norm() / bf16.norm()).item()
    assert err < 0.1, err  # e4m3 keeps 3 mantissa bits: a few percent through a tiny model
    assert ((compiled - fp8).norm() / fp8.norm()).item() < 0.05


def test_fp8_weights_of_flux_dev_from_its_config():
    """README's figure: on FLUX.1-dev's real config (built on the meta device), the family rule turns 8.6 B of its
    11.9 B parameters to FP8: 14.2 GiB of weights (one byte each, one float32 factor per row) instead of 22.2."""
    from diffusers import FluxTransformer2DModel

    from clear_surgery.surgery.tools.bench import FLUX_DEV

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    weights = [model.get_submodule(name).weight for name in q.fp8_targets(model)]
    total = sum(p.numel() for p in model.parameters())
    fp8 = sum(w.numel() for w in weights)
    gib = ((total - fp8) * 2 + fp8 + sum(w.shape[0] for w in weights) * 4) / 2**30
    assert round(fp8 / 1e9, 1) == 8.6 and round(total / 1e9, 1) == 11.9
    assert round(total * 2 / 2**30, 1) == 22.2 and round(gib, 1) == 14.2
