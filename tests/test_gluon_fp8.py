"""The FP8 backend (gluon-fp8): its kernel compiled for sm_90 on CPU, its launches (the bf16 kernel's mask
lists, text rows on the bf16 kernel, the scales), the accuracy its arithmetic allows, the chooser's rule
that FP8 is never chosen unasked; on a Hopper GPU the kernel against the float64 reference.

The tolerance, from the format: e4m3 keeps 3 mantissa bits, so one rounding errs by at most 2**-4 (6.25%)
of the value and by about 2**-4 / sqrt(3) = 3.6% RMS. An image row's output takes two independent roundings
that do not average away (V's, and P's), so its relative RMS error is about sqrt(2) x 3.6% = 5.1% against
float64; the roundings of Q and K move the scores by about 1 / sqrt(head_dim) of that. Measured on random
inputs (fp8_emulated_attention): 4.1 to 5.4%. FP8_TOLERANCE = 7% leaves room for the kernel's bf16 output
and its rounding of P against a running max; the bf16 kernel's error is ~0.2%, so a test at 7% still fails
for any mistake bigger than the format's (a wrong scale, a lost block, a transposed V).
"""

import math

import pytest
import torch

pytest.importorskip("triton")
from clear_surgery.plugins import BACKENDS, TokenLayout, attention, reference_attention  # noqa: E402
from clear_surgery.plugins import backends as backend_registry  # noqa: E402
from clear_surgery.plugins import gluon_backend, gluon_fp8_backend  # noqa: E402
from clear_surgery.plugins.backends import FP8, Backend, choose_backend, register_backend  # noqa: E402
from clear_surgery.plugins.gluon_backend import BLOCK  # noqa: E402
from clear_surgery.plugins.fp8_quantize import p_register_order, value_operand  # noqa: E402
from clear_surgery.plugins.gluon_fp8_backend import E4M3_MAX, fp8_emulated_attention, quantize_per_head  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_gluon import compile_for_sm90, needs_gluon  # noqa: E402

FP8_TOLERANCE = 0.07  # relative RMS error of the image rows against float64 (module docstring)
FORMAT_FLOOR = 0.02  # an "FP8" result closer than this to float64 did not round through e4m3

# (batch, heads, head_dim, text_len, text_first, grid h, grid w, radius, tile): odd grids, text first and
# last, no text, r from 1 to beyond the grid, head dims 64 and 128, batch 2
CASES = [
    (2, 3, 64, 64, True, 16, 12, 4, None),
    (1, 2, 128, 64, False, 16, 16, 8, (8, 8)),
    (1, 2, 128, 0, True, 16, 16, 2, (8, 8)),
    (1, 2, 64, 64, True, 8, 8, 100, None),
    (1, 2, 128, 128, True, 32, 24, 1, (8, 8)),
    (1, 2, 128, 128, False, 24, 32, 64, (8, 16)),
]


def _inputs(case, device="cpu", seed=0):
    b, h, d, text_len, text_first, gh, gw, r, tile = case
    layout = TokenLayout(text_len, text_first, gh, gw, tile)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, layout.seq_len, h, d, generator=gen, device=device).to(torch.bfloat16)
               for _ in range(3))
    return q, k, v, layout, r


def _image_rows(layout):
    return slice(layout.image_start, layout.image_start + layout.image_tokens)


@needs_gluon
@pytest.mark.parametrize("head_dim", [128, 64])
def test_fp8_kernel_compiles_for_sm90_with_e4m3_tensor_cores(head_dim):
    stages, maxnreg = gluon_backend.PINGPONG_PROGRAM
    constexprs = dict(BLOCK_N=BLOCK, HEAD_DIM=head_dim, STAGES=stages, STORE_LSE=True, num_warps=4, FP8=True)
    compiled = compile_for_sm90(gluon_backend.clear_fwd_pingpong_kernel, head_dim, BLOCK, BLOCK, constexprs, maxnreg,
                                dtype=torch.float8_e4m3fn)
    ptx = compiled.asm["ptx"]
    assert f"m64n{BLOCK}k32.f32.e4m3.e4m3" in ptx  # Q·Kᵀ on the e4m3 tensor cores (K = 32 per instruction)
    assert f"m64n{head_dim}k32.f32.e4m3.e4m3" in ptx  # P·V too
    assert "bf16" not in ptx.split("wgmma")[1][:40]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # P quantized in registers
    # P's columns relabelled to the operand's register order: no byte shuffles between threads beyond the bf16
    # kernel's (its row max and sum); without the relabelling, 32 more shuffles and 32 byte permutes per block
    bf16 = compile_for_sm90(gluon_backend.clear_fwd_pingpong_kernel, head_dim, BLOCK, BLOCK, dict(constexprs, FP8=False),
                            maxnreg).asm["ptx"]
    assert "prmt" not in ptx and ptx.count("shfl.sync") <= bf16.count("shfl.sync")
    # one byte per element: Q blocks and K/V rings take half the bf16 kernel's shared memory
    assert compiled.metadata.shared < (2 * (BLOCK + 2 * stages * BLOCK) * head_dim) * 1.1


class _Launches:
    """Stands in for a Gluon kernel: records each launch's grid and arguments."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, args, kwargs))


def _torch_quantize_heads(t, transposed=False):
    """fp8_quantize.quantize_heads in PyTorch (its Triton passes are checked against this below)."""
    quantized, factor = quantize_per_head(t)
    return (value_operand(quantized) if transposed else quantized), factor


QUANTIZE_CASES = ((1, 37, 3, 16), (2, 130, 2, 64), (1, 192, 2, 16))  # batch, tokens, heads, head_dim
QUANTIZE_CHECK = """
import sys, torch
from clear_surgery.plugins.fp8_quantize import quantize_heads, quantize_per_head, scales, value_operand
torch.manual_seed(0)
device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
for batch, tokens, heads, dim in %r:
    t = (torch.randn(batch, tokens, heads, dim) * torch.logspace(-3, 2, heads).view(1, 1, heads, 1)).to(torch.bfloat16)
    t[0, :, 0] = 0  # a head of zeros: finite scales, zeros out
    want, want_factor = quantize_per_head(t)
    if dtype == torch.float32:  # the scaled values before rounding
        want = t.float() * scales(t.float().abs().amax(dim=(1, 3)))[1].view(batch, 1, heads, 1)
    for transposed in (False, True):
        got, factor = quantize_heads(t.to(device), transposed, dtype)
        expect = value_operand(want) if transposed else want
        assert got.shape == expect.shape and got.is_contiguous() and got.dtype == dtype, (got.shape, expect.shape)
        bits = torch.uint8 if dtype != torch.float32 else torch.int32
        got_bits, want_bits = got.cpu().view(bits).flatten(), expect.contiguous().view(bits).flatten()
        if not torch.equal(got_bits, want_bits):  # say which values differ: a GPU run may be the only witness
            wrong = (got_bits != want_bits).nonzero().flatten()
            scaled = (t.float() * scales(t.float().abs().amax(dim=(1, 3)))[1].view(batch, 1, heads, 1))
            scaled = (value_operand(scaled) if transposed else scaled).flatten()
            raise AssertionError(f"case {(batch, tokens, heads, dim)}, transposed={transposed}: {len(wrong)} of "
                                 f"{got_bits.numel()} differ; scaled value, got, want: "
                                 + ", ".join(f"{scaled[i].item():.9g} {got_bits[i].item():#x} {want_bits[i].item():#x}"
                                             for i in wrong[:8].tolist()))
        assert torch.equal(factor.cpu(), want_factor), (factor.cpu(), want_factor)
        assert bool(torch.isfinite(factor).all())
print("ok")
""" % (QUANTIZE_CASES,)


def _quantize_check(device: str, dtype: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1") if device == "cpu" else None
    done = subprocess.run([sys.executable, "-c", QUANTIZE_CHECK, device, dtype], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_relabelled_p_times_reordered_v_is_p_times_v():
    """The kernel's relabelling of P's columns (_p_operand: reshape to (rows, blocks of 32, 2, 2, 4, 2), swap
    the middle two) with V's keys in p_register_order (value_operand) leaves P·V unchanged: here in PyTorch,
    the same index arithmetic, over two key blocks and a partial third."""
    order = p_register_order()
    assert sorted(order.tolist()) == list(range(64))  # a permutation within the block
    p = torch.randn(64, 64, dtype=torch.float64)
    relabelled = p.reshape(64, 2, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(64, 64)
    assert torch.equal(relabelled[:, order], p)  # column order(c) of the relabelled P is column c of P
    v = torch.randn(1, 160, 1, 8, dtype=torch.float64)  # 160 keys: two whole blocks, 32 left as they are
    v_operand = value_operand(v)  # (head_dim, keys)
    for block in range(2):
        keys = slice(64 * block, 64 * block + 64)
        assert torch.allclose(relabelled @ v_operand[:, keys].T, p @ v[0, keys, 0])
    assert torch.equal(v_operand[:, 128:], v[0, 128:, 0].T)


def test_the_quantize_kernels_scale_as_the_pytorch_quantization():
    """The two Triton passes (largest magnitude per head, then scale, V's written transposed) under
    TRITON_INTERPRET=1: bit for bit the float32 values quantize_per_head rounds, and its scales (odd token
    counts, batch 1 and 2, heads a thousandfold apart, a head of zeros). The rounding to e4m3 is compared on
    the GPU (the interpreter's own e4m3 rounding is off for some values)."""
    _quantize_check("cpu", "float32")
    from clear_surgery.plugins.fp8_quantize import quantize_heads

    with pytest.raises(ValueError, match="head_dim must be a power of two of at least 16, got 48"):
        quantize_heads(torch.zeros(1, 8, 2, 48))


@pytest.fixture
def launches(monkeypatch) -> list:
    """The Gluon kernels of both backends replaced by recorders (and the quantization by its PyTorch twin, the
    CPU cannot launch Triton kernels outside the interpreter): the launches, in order."""
    log = []
    for module in (gluon_backend, gluon_fp8_backend):
        monkeypatch.setattr(module, "clear_fwd_pingpong_kernel", _Launches("pingpong", log))
        monkeypatch.setattr(module, "gluon_reason", lambda *a, **k: None)
    monkeypatch.setattr(gluon_backend, "clear_fwd_ws_kernel", _Launches("ws", log))
    monkeypatch.setattr(gluon_fp8_backend, "quantize_heads", _torch_quantize_heads)
    return log


@needs_gluon
@pytest.mark.parametrize("text_first,b", [(True, 2), (False, 2), (True, 1)])
def test_fp8_launches_the_bf16_kernels_lists_and_text_rows(launches, text_first, b):
    """On CPU, the kernels replaced by recorders: the FP8 launch takes the bf16 launch's mask lists, its
    image queries only (no text items), Q, K and V in e4m3 with their scales, V transposed; the text rows
    go to the bf16 kernel in the same output buffer. Batch 1: V's transpose must still be a copy (a view's
    strides are not TMA's)."""
    h, d = 3, 64
    layout = TokenLayout(128, text_first, 16, 24, (8, 8))
    q, k, v = (torch.randn(b, layout.seq_len, h, d).to(torch.bfloat16) * (i + 1) for i in range(3))
    gluon_backend.gluon_clear_attention(q, k, v, layout, 5.0)
    log = launches
    bf16_args = log.pop()[2]
    out = gluon_fp8_backend.gluon_fp8_clear_attention(q, k, v, layout, 5.0)
    (text_name, text_grid, text_args, _), (name, grid, args, kwargs) = log
    names = [  # the kernel's arguments, in order
        "q_desc", "k_desc", "v_desc", "O", "LSE", "stride_ob", "stride_on", "stride_oh", "TOKENS", "HEADS", "BH",
        "TEXT_LEN", "TEXT_START", "IMAGE_LEN", "IMAGE_START", "qk_scale", "U_COUNT", "U_UNMASKED", "U_INDEX",
        "U_ENTRY", "MASK_BITS", "width", "text_items", "image_items", "DESCALE"]
    fp8 = dict(zip(names, args))
    bf16 = dict(zip(names, bf16_args))
    for key in ("U_COUNT", "U_UNMASKED", "U_INDEX", "U_ENTRY", "MASK_BITS"):
        assert torch.equal(fp8[key], bf16[key]), key
    for key in ("width", "TEXT_LEN", "TEXT_START", "IMAGE_LEN", "IMAGE_START", "qk_scale", "image_items"):
        assert fp8[key] == bf16[key], key
    assert kwargs["FP8"] is True and fp8["text_items"] == 0  # image queries only
    assert grid == (layout.image_tokens // BLOCK * b * h // 2,)  # two image query blocks per program
    assert fp8["O"] is out and text_args[3] is out  # one output: text rows by the bf16 kernel
    assert text_name == "pingpong" and text_grid == (layout.text_len // BLOCK * b * h // 2,)
    assert dict(zip(names, text_args))["text_items"] == layout.text_len // BLOCK
    descale = fp8["DESCALE"]
    assert descale.shape == (3, b * h) and descale.dtype == torch.float32
    for i, t in enumerate((q, k, v)):
        want = t.float().abs().amax(dim=(1, 3)).flatten() / E4M3_MAX
        assert torch.allclose(descale[i], want), i
    v8, _ = quantize_per_head(v)
    v_t = fp8["v_desc"].base
    assert v_t.shape == (b * h * d, layout.seq_len) and v_t.is_contiguous() and list(fp8["v_desc"].block_shape) == [d, BLOCK]
    assert torch.equal(v_t.view(torch.uint8), value_operand(v8).view(torch.uint8))
    assert fp8["q_desc"].base.dtype == torch.float8_e4m3fn and fp8["k_desc"].base.dtype == torch.float8_e4m3fn


@needs_gluon
def test_text_rows_on_a_second_stream_launch_as_on_one(launches):
    """concurrent_text changes where the text rows' launch is enqueued, not what is launched (on the CPU, where
    there are no streams, it runs on one)."""
    layout = TokenLayout(128, False, 16, 24, (8, 8))
    q = torch.randn(2, layout.seq_len, 3, 64).to(torch.bfloat16)
    gluon_fp8_backend.gluon_fp8_clear_attention(q, q, q, layout, 5.0, concurrent_text=False)
    gluon_fp8_backend.gluon_fp8_clear_attention(q, q, q, layout, 5.0)  # the default: a second stream
    log = launches
    assert [(name, grid) for name, grid, _, _ in log[:2]] == [(name, grid) for name, grid, _, _ in log[2:]]
    assert [kwargs for *_, kwargs in log[:2]] == [kwargs for *_, kwargs in log[2:]]


@needs_gluon
def test_the_overlap_option_reaches_the_ping_pong_kernel_only(launches):
    """overlap=True launches the ping-pong kernel with OVERLAP (and the FP8 backend with its stages); asked of
    a call the ping-pong kernel cannot take, it is refused rather than dropped."""
    layout = TokenLayout(128, True, 16, 24, (8, 8))
    q = torch.randn(2, layout.seq_len, 3, 64).to(torch.bfloat16)
    gluon_backend.gluon_clear_attention(q, q, q, layout, 5.0, overlap=True)
    gluon_fp8_backend.gluon_fp8_clear_attention(q, q, q, layout, 5.0, overlap=True, stages=5)
    log = launches
    assert [entry[0] for entry in log] == ["pingpong", "pingpong", "pingpong"]  # bf16; FP8's text rows, image rows
    assert log[0][3]["OVERLAP"] is True and log[1][3]["OVERLAP"] is False  # the text rows: the plain kernel
    assert log[2][3]["OVERLAP"] is True and log[2][3]["STAGES"] == 5
    with pytest.raises(ValueError, match="overlap is a variant of the ping-pong kernel"):
        gluon_backend.gluon_clear_attention(q, q, q, layout, 5.0, pingpong=False, overlap=True)
    for stages in (2, 7):  # two would deadlock the overlap variant; seven do not fit in shared memory
        with pytest.raises(ValueError, match=f"stages must be 3 to 6, got {stages}"):
            gluon_fp8_backend.gluon_fp8_clear_attention(q, q, q, layout, 5.0, overlap=True, stages=stages)
    assert len(log) == 3  # nothing launched


def test_quantize_per_head_uses_the_range_and_rounds_through_e4m3():
    t = torch.randn(2, 50, 3, 16).to(torch.bfloat16) * torch.tensor([1.0, 1e-3, 300.0]).view(1, 1, 3, 1)
    quantized, factor = quantize_per_head(t)
    assert quantized.dtype == torch.float8_e4m3fn and factor.shape == (6,)
    back = quantized.float() * factor.view(2, 1, 3, 1)
    assert quantized.float().abs().amax() == E4M3_MAX  # the largest magnitude maps to e4m3's largest
    error = (back - t.float()).abs() / t.float().abs().clamp_min(1e-30)
    big = t.float().abs() > t.float().abs().amax(dim=(1, 3), keepdim=True) / 64  # normal e4m3 numbers
    assert error[big].max() <= 2.0**-4 + 1e-3  # half a step of 3 mantissa bits
    assert rel_err(back, t.float()) > 0.01  # it did round


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_the_fp8_arithmetic_errs_as_the_format_predicts(case):
    q, k, v, layout, r = _inputs(case)
    exact = reference_attention(q.double(), k.double(), v.double(), layout, r)
    emulated = fp8_emulated_attention(q, k, v, layout, r)
    rows = _image_rows(layout)
    assert FORMAT_FLOOR < rel_err(emulated[:, rows], exact[:, rows]) < FP8_TOLERANCE
    bf16 = reference_attention(q, k, v, layout, r)
    assert rel_err(bf16[:, rows], exact[:, rows]) < 0.005  # what FP8 costs against bf16
    if layout.text_len:
        text = slice(0, layout.text_len) if layout.text_first else slice(layout.image_tokens, None)
        assert torch.equal(emulated[:, text], exact[:, text])  # text rows stay in high precision


def _fake_fp8_backend(log):
    def forward(q, k, v, layout, radius, scale=None, **options):
        log.append("fake-fp8")
        return reference_attention(q, k, v, layout, radius, scale, **options)

    return Backend("fake-fp8", forward, lambda *a: None, features=frozenset({FP8}), priority={"cpu": 99})


def test_fp8_attention_is_chosen_only_when_asked(monkeypatch):
    monkeypatch.setattr(backend_registry, "BACKENDS", dict(BACKENDS))
    log = []
    register_backend(_fake_fp8_backend(log))
    q, k, v, layout, r = _inputs(CASES[0])
    kwargs = dict(text_len=layout.text_len, text_first=layout.text_first, height=layout.height, width=layout.width,
                  radius=r)
    assert choose_backend("auto", q, k, v, layout, r).name != "fake-fp8"  # never silently
    assert choose_backend("auto", q, k, v, layout, r, needs={FP8}).name == "fake-fp8"
    assert choose_backend("fake-fp8", q, k, v, layout, r).name == "fake-fp8"  # naming it is asking
    # a call that asks runs elsewhere where the FP8 backend cannot take it (a wish, not a need)
    assert choose_backend("reference", q, k, v, layout, r, needs={FP8}).name == "reference"
    plain = attention(q, k, v, **kwargs)
    assert log == []
    asked = attention(q, k, v, **kwargs, fp8=True)
    assert log == ["fake-fp8"] and torch.equal(plain, asked)


def test_a_model_asks_for_fp8_attention_through_set_backend(monkeypatch):
    from clear_surgery.surgery import ClearConfig, apply_clear, set_backend
    from clear_surgery.surgery.core.families import EXAMPLE_GRID, example_inputs
    from conftest import coverage_model

    monkeypatch.setattr(backend_registry, "BACKENDS", dict(BACKENDS))
    log = []
    register_backend(_fake_fp8_backend(log))
    model, _ = coverage_model("FLUX.1 (FluxTransformer2DModel)")
    inputs = example_inputs(model, 8, EXAMPLE_GRID)
    apply_clear(model, ClearConfig(radius=2))
    with torch.no_grad():
        model(**inputs)
        assert log == []
        set_backend(model, "auto", fp8_attention=True)
        model(**inputs)
        calls = len(log)
        set_backend(model, "auto")  # None keeps the choice
        model(**inputs)
        assert calls > 0 and len(log) == 2 * calls
        set_backend(model, "auto", fp8_attention=False)
        model(**inputs)
        assert len(log) == 2 * calls


# ---- GPU (Hopper) ----------------------------------------------------------------------------------------------

GPU_CASES = [
    (1, 24, 128, 512, True, 64, 64, 16, (8, 8)),  # FLUX 1024²
    (2, 8, 128, 256, False, 48, 40, 10, (8, 8)),  # batch 2, text last, non-square
    (1, 8, 128, 64, True, 32, 24, 1, (8, 8)),  # r = 1
    (1, 8, 128, 128, True, 16, 24, 100, (8, 8)),  # r beyond the grid
    (1, 6, 64, 128, True, 40, 32, 6.5, (8, 8)),  # head dim 64
    (1, 4, 128, 64, False, 24, 32, 64, (8, 16)),
    (1, 4, 128, 128, True, 24, 32, 32, (8, 8)),
]


@pytest.mark.gpu
def test_gpu_quantize_kernels_round_as_pytorch_does():
    _quantize_check("cuda", "float8_e4m3fn")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"case{i}" for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("options", [{}, {"overlap": True, "stages": 5}], ids=["plain", "overlap"])
def test_gpu_fp8_kernel_matches_the_reference_within_the_format(case, options):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 kernel is for Hopper")
    q, k, v, layout, r = _inputs(case, "cuda", seed=3)
    assert BACKENDS["gluon-fp8"].can_run(q, k, v, layout, r, needs={FP8}, raise_error=True)
    poison = torch.full_like(q, float("nan"))
    out, lse = gluon_fp8_backend.gluon_fp8_clear_attention(q, k, v, layout, r, out=poison, return_lse=True, **options)
    assert not out.isnan().any()
    exact, exact_lse = reference_attention(q.double(), k.double(), v.double(), layout, r, return_lse=True)
    rows = _image_rows(layout)
    error = rel_err(out[:, rows], exact[:, rows])
    emulated = fp8_emulated_attention(q, k, v, layout, r)
    print(f"fp8 image rows: {error:.4f} vs float64, {rel_err(out[:, rows], emulated[:, rows]):.4f} vs emulation")
    assert error < FP8_TOLERANCE
    assert rel_err(out[:, rows], emulated[:, rows]) < 0.03  # the same roundings, up to P's running max
    text = slice(0, layout.text_len) if layout.text_first else slice(layout.image_tokens, None)
    assert rel_err(out[:, text], exact[:, text]) < 1e-2  # text rows: the bf16 kernel
    assert (lse.double() - exact_lse).abs().max() < 0.1  # scores from e4m3 Q and K: log-sum-exp within ~0.1
    assert math.isfinite(error)


@pytest.mark.gpu
def test_gpu_auto_runs_fp8_only_when_asked():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 kernel is for Hopper")
    q, k, v, layout, r = _inputs(GPU_CASES[0], "cuda")
    kwargs = dict(text_len=layout.text_len, text_first=True, height=64, width=64, radius=r, tile=(8, 8))
    assert choose_backend("auto", q, k, v, layout, r).name == "gluon"
    assert choose_backend("auto", q, k, v, layout, r, needs={FP8}).name == "gluon-fp8"
    bf16, fp8 = attention(q, k, v, **kwargs), attention(q, k, v, **kwargs, fp8=True)
    exact = reference_attention(q.double(), k.double(), v.double(), layout, r)
    assert rel_err(bf16, exact) < 5e-3 < rel_err(fp8, exact) < FP8_TOLERANCE
    with torch.enable_grad():  # FP8 attention is an inference setting: gradients run the bf16 backends
        leaf = q.clone().requires_grad_(True)
        attention(leaf, k, v, **kwargs, fp8=True).sum().backward()
        assert leaf.grad is not None and leaf.grad.isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", [0, 1], ids=["flux-1024", "batch2-text-last"])
def test_gpu_text_rows_on_a_second_stream_give_the_same_bytes(case):
    """concurrent_text: the text rows' launch on a second stream, beside the quantization and the image rows,
    writes the same output and log-sum-exp, bit for bit, as one stream (both kernels are deterministic), every
    time, and what the caller runs next waits for it (the output is read right after, on the caller's stream)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 kernel is for Hopper")
    q, k, v, layout, r = _inputs(GPU_CASES[case], "cuda", seed=5)
    want, want_lse = gluon_fp8_backend.gluon_fp8_clear_attention(q, k, v, layout, r, return_lse=True,
                                                                 concurrent_text=False)
    for _ in range(5):
        poison = torch.full_like(q, float("nan"))
        got, lse = gluon_fp8_backend.gluon_fp8_clear_attention(q, k, v, layout, r, out=poison, return_lse=True,
                                                               concurrent_text=True)
        assert torch.equal(got, want) and torch.equal(lse, want_lse)
