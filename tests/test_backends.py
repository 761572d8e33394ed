import math

import pytest
import torch

from clear_surgery.plugins import TokenLayout, attention, flex_clear_attention, reference_attention
from conftest import rel_err

# (batch, heads, head_dim, text_len, text_first, height, width, radius)
CASES = [
    (2, 3, 16, 5, True, 6, 7, 1),
    (2, 2, 16, 5, False, 6, 7, 2),
    (1, 2, 32, 0, True, 9, 4, 2.5),
    (2, 1, 16, 11, False, 1, 13, 3),
    (1, 2, 16, 4, True, 12, 12, 4),
    (2, 2, 16, 3, False, 5, 8, math.hypot(5, 8) + 1),  # beyond the grid diagonal: dense
    (1, 4, 16, 130, True, 11, 13, 5),  # text segment spans more than a 128-token block
    (1, 2, 64, 9, False, 17, 10, 7),
]
TILES = [None, (4, 8)]


def _inputs(b, h, d, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]


def _run(fn, tensors, args):
    q, k, v = tensors
    out = fn(q, k, v, *args)
    grad = torch.randn_like(out, dtype=torch.float32, generator=torch.Generator().manual_seed(99)).to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", TILES, ids=["raster", "tiled"])
def test_flex_matches_reference(case, dtype, tile):
    b, h, d, text_len, text_first, hh, ww, r = case
    n = text_len + hh * ww
    args = (TokenLayout(text_len, text_first, hh, ww, tile), r, None)
    tensors = _inputs(b, h, d, n, dtype, seed=hash(case) % 1000)
    # truth: the reference in float64
    truth = _run(reference_attention, [t.detach().double().requires_grad_(True) for t in tensors], args)
    flex = _run(flex_clear_attention, [t.detach().clone().requires_grad_(True) for t in tensors], args)
    ref = _run(reference_attention, [t.detach().clone().requires_grad_(True) for t in tensors], args)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, f, r_, t in zip(("out", "dq", "dk", "dv"), flex, ref, truth):
        assert rel_err(f, t) < tol, name
        assert rel_err(r_, t) < tol, name


def test_small_radius_changes_output_and_large_radius_is_dense():
    q, k, v = (torch.randn(2, 4 + 30, 2, 16) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    big = attention(q, k, v, text_len=4, text_first=True, height=5, width=6, radius=100, backend="flex")
    small = attention(q, k, v, text_len=4, text_first=True, height=5, width=6, radius=1.5, backend="flex")
    assert rel_err(big, dense) < 1e-5
    assert rel_err(small, dense) > 1e-2
    # text queries keep full attention whatever the radius
    assert rel_err(small[:, :4], dense[:, :4]) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_op_autograd_matches_backend(backend):
    args = dict(text_len=3, text_first=False, height=4, width=5, radius=2.2)
    q, k, v = _inputs(2, 2, 16, 23, torch.float32, seed=5)
    out = attention(q, k, v, backend=backend, **args)
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, TokenLayout(3, False, 4, 5), 2.2)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert rel_err(a.grad, b.grad) < 1e-5


def test_opcheck():
    q, k, v = _inputs(1, 2, 16, 3 + 12, torch.float32, seed=1)
    torch.library.opcheck(torch.ops.clear.attention.default, (q, k, v, 3, True, 3, 4, 2.0, None, "reference"))


def test_export_sees_one_node():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, text_len=2, text_first=True, height=3, width=4, radius=2)

    q = torch.randn(1, 14, 2, 16)
    program = torch.export.export(Layer(), (q, q, q))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.clear.attention.default]
    assert torch.equal(program.module()(q, q, q), Layer()(q, q, q))


def test_compile_matches_eager():
    q, k, v = (torch.randn(1, 14, 2, 16) for _ in range(3))

    def f(q, k, v):
        return attention(q * 2, k, v, text_len=2, text_first=True, height=3, width=4, radius=2) + 1

    assert torch.allclose(torch.compile(f, backend="eager", fullgraph=True)(q, k, v), f(q, k, v))


def test_unknown_backend_and_bad_grid():
    q = torch.randn(1, 14, 2, 16)
    with pytest.raises(ValueError, match="unknown CLEAR backend"):
        attention(q, q, q, text_len=2, text_first=True, height=3, width=4, radius=2, backend="nope")
    with pytest.raises(ValueError, match="does not match the sequence"):
        attention(q, q, q, text_len=2, text_first=True, height=3, width=5, radius=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [None, (8, 16)])
def test_gpu_flex_matches_reference_with_gradients(tile):
    layout = TokenLayout(77, False, 40, 52, tile)
    n = 77 + 40 * 52
    tensors = [torch.randn(2, n, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad = torch.randn(2, n, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = flex_clear_attention(*tensors, layout, 9)
    got = (out, *torch.autograd.grad(out, tensors, grad))
    ref_in = [t.detach().float().requires_grad_(True) for t in tensors]
    ref = reference_attention(*ref_in, layout, 9)
    want = (ref, *torch.autograd.grad(ref, ref_in, grad.float()))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2


@pytest.mark.gpu
def test_gpu_flex_stays_compiled_across_many_resolutions():
    """Past dynamo's default recompile limit, flex must still run compiled: timed against the unfused
    eager FlexAttention on the same call (a ratio, not a wall-clock bound: a busy GPU slows both)."""
    from torch.nn.attention.flex_attention import flex_attention

    from clear_surgery.plugins.flex import clear_block_mask

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for side in range(20, 44, 2):  # 12 resolutions: more than dynamo's default recompile limit (8)
        q = torch.randn(1, 16 + side * side, 4, 64, device="cuda", dtype=torch.bfloat16)
        flex_clear_attention(q, q, q, TokenLayout(16, True, side, side), 5)
    q = torch.randn(1, 512 + 96 * 96, 24, 128, device="cuda", dtype=torch.bfloat16)
    layout = TokenLayout(512, True, 96, 96)
    compiled = ms(lambda: flex_clear_attention(q, q, q, layout, 16))
    mask = clear_block_mask(layout, 16, q.device)
    qt = q.transpose(1, 2)
    eager = ms(lambda: flex_attention(qt, qt, qt, block_mask=mask))
    assert compiled < eager / 5, (compiled, eager)  # H200: a few ms against hundreds


# -- log-sum-exp of each query row (return_lse), and exact merging of partial results by it

def _naive_lse(q, k, layout, r, scale=None):
    """Independent of the backends: every (query, key) pair scored and masked one by one from positions."""
    from clear_surgery.plugins.layout import dense_mask

    mask = dense_mask(layout, r)
    scores = torch.einsum("bnhd,bmhd->bnhm", q.double(), k.double()) * (scale or q.shape[-1] ** -0.5)
    return torch.where(mask[None, :, None, :], scores, -math.inf).logsumexp(-1)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("tile", TILES, ids=["raster", "tiled"])
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_lse_matches_an_independent_computation(case, tile, backend):
    b, h, d, text_len, text_first, hh, ww, r = case
    layout = TokenLayout(text_len, text_first, hh, ww, tile)
    q, k, v = (t.detach() for t in _inputs(b, h, d, layout.seq_len, torch.float32, seed=11))
    fn = reference_attention if backend == "reference" else flex_clear_attention
    out, lse = fn(q, k, v, layout, r, scale=0.3, return_lse=True)
    assert lse.shape == (b, layout.seq_len, h) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), _naive_lse(q, k, layout, r, scale=0.3), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, r, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_first", [True, False])
def test_partials_merged_by_lse_equal_the_whole(text_first):
    """Keys split into text, one band of image rows and the rest (as ranks would hold them): the parts'
    attention merged by their log-sum-exp is CLEAR attention over all keys, exactly (fp64)."""
    from clear_surgery.plugins import merge_partials
    from clear_surgery.plugins.layout import dense_mask

    layout, r = TokenLayout(6, text_first, 9, 7), 2.5
    q, k, v = (t.detach().double() for t in _inputs(2, 2, 16, layout.seq_len, torch.float32, seed=5))
    mask = dense_mask(layout, r)
    is_image, y, _ = layout.positions()
    parts = [~is_image, is_image & (y < 4), is_image & (y >= 4)]
    outs, lses = [], []
    for keys in parts:
        scores = torch.einsum("bnhd,bmhd->bnhm", q, k) * 16 ** -0.5
        scores = torch.where((mask & keys[None, :])[None, :, None, :], scores, -math.inf)
        lse = scores.logsumexp(-1)
        weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("bnhm,bmhd->bnhd", weights, v))
        lses.append(lse)
    out, lse = merge_partials(outs, lses)
    whole, whole_lse = reference_attention(q, k, v, layout, r, return_lse=True)
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse.double(), whole_lse.double(), atol=1e-5, rtol=1e-6)
    assert torch.isinf(lses[1]).any()  # some queries see nothing of a band: handled, not NaN


def test_front_door_returns_lse():
    layout = TokenLayout(4, False, 5, 6)
    q, k, v = (t.detach() for t in _inputs(1, 2, 16, layout.seq_len, torch.float32, seed=3))
    out, lse = attention(q, k, v, text_len=4, text_first=False, height=5, width=6, radius=2, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout, 2, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    with pytest.raises(ValueError, match="triton-aot backend: does not support lse"):
        attention(q, k, v, text_len=4, text_first=False, height=5, width=6, radius=2, backend="triton-aot",
                  return_lse=True)


def _padding_forms(valid):
    """The masks models pass for the same padding (valid: (batch, tokens) bool)."""
    f = valid.double()
    hide = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(~valid, -10000.0)[:, None, None, :]
    return {"bool-key": valid[:, None, None, :], "bool-query-key": valid[:, None, None, :] & valid[:, None, :, None],
            "float-key": hide, "float-0/1-query-key": f[:, None, None, :] * f[:, None, :, None]}


def _padded_cases(layout, radius, lengths, head_dim, seed):
    """Per mask form: (name, the model's mask, float64 leaves, the truth: SDPA with the CLEAR mask and the
    model's combined, rows that see nothing giving 0, and the truth's gradients for a random grad)."""
    from clear_surgery.plugins import dense_mask

    text_valid = torch.arange(layout.text_len)[None, :] < torch.tensor(lengths)[:, None]
    image = torch.ones(len(lengths), layout.image_tokens, dtype=torch.bool)
    valid = torch.cat([text_valid, image] if layout.text_first else [image, text_valid], 1)
    window = dense_mask(layout, radius)
    leaves = _inputs(len(lengths), 2, head_dim, layout.seq_len, torch.float64, seed=seed)
    grad = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name, mask in _padding_forms(valid).items():
        added = mask if mask.dtype != torch.bool else torch.zeros(()).double().masked_fill(~mask, float("-inf"))
        truth = torch.nan_to_num(torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in leaves), attn_mask=torch.where(window, added, float("-inf"))).transpose(1, 2))
        yield name, mask, leaves, truth, grad, torch.autograd.grad(truth, leaves, grad)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("tile", TILES, ids=["raster", "tiled"])
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_text_padding_equals_sdpa_with_the_combined_mask(text_first, tile, backend):
    """Every mask form, forward and backward, batch of three text lengths (one without any text)."""
    layout, r = TokenLayout(9, text_first, 5, 7, tile), 2.5
    dtype, tol = (torch.float64, 1e-10) if backend == "reference" else (torch.float32, 2e-5)
    for name, mask, leaves, truth, grad, want in _padded_cases(layout, r, [9, 4, 0], 16, seed=3):
        mine = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        out = attention(*mine, text_len=9, text_first=text_first, height=5, width=7, radius=r, tile=tile,
                        attn_mask=mask if mask.dtype == torch.bool else mask.to(dtype), backend=backend)
        assert rel_err(out, truth) < tol, name
        for which, g, w in zip("qkv", torch.autograd.grad(out, mine, grad.to(dtype)), want):
            assert rel_err(g, w) < tol, (name, which)


@pytest.mark.gpu
@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_gpu_text_padding_equals_sdpa_with_the_combined_mask(text_first, backend):
    layout, r = TokenLayout(77, text_first, 20, 28), 4
    for name, mask, leaves, truth, grad, want in _padded_cases(layout, r, [77, 30, 1], 64, seed=8):
        mine = [x.detach().to("cuda", torch.bfloat16).requires_grad_(True) for x in leaves]
        out = attention(*mine, text_len=77, text_first=text_first, height=20, width=28, radius=r, backend=backend,
                        attn_mask=(mask if mask.dtype == torch.bool else mask.to(torch.bfloat16)).cuda())
        assert rel_err(out.cpu(), truth) < 2e-2, name
        got = torch.autograd.grad(out, mine, grad.to("cuda", torch.bfloat16))
        for which, g, w in zip("qkv", got, want):
            assert rel_err(g.cpu(), w) < 3e-2, (name, which)
