"""The warp-specialized Hopper kernel (gluon backend): compiled for sm_90 on CPU, its mask words and
refusals on CPU, and on the H200 every case against the pure-PyTorch reference."""

import pytest
import torch

pytest.importorskip("triton")
from clear_surgery.plugins import BACKENDS, TokenLayout, attention, reference_attention  # noqa: E402
from clear_surgery.plugins import gluon_backend  # noqa: E402
from clear_surgery.plugins.gluon_backend import BLOCK, gluon_clear_attention, gluon_reason, group_lists  # noqa: E402
from clear_surgery.plugins.layout import dense_mask  # noqa: E402
from conftest import rel_err  # noqa: E402

needs_gluon = pytest.mark.skipif(gluon_backend.clear_fwd_ws_kernel is None, reason="triton without Gluon's Hopper API")


def compile_for_sm90(kernel, head_dim, q_rows, block_n, constexprs, maxnreg, dtype=torch.bfloat16):
    """Compile a Gluon kernel of this backend for sm_90 on the CPU (no GPU needed). FP8 (``constexprs["FP8"]``):
    Q, K, V in ``dtype``, V's blocks transposed."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    rows = torch.zeros(4 * BLOCK, 4 * head_dim).to(dtype)
    gl_dtype = gl.float8e4nv if dtype == torch.float8_e4m3fn else gl.bfloat16

    def desc(shape):
        layout = gl.NVMMASharedLayout.get_default_for(shape, gl_dtype)
        return mangle_type(TensorDescriptor(rows, list(rows.shape), list(rows.stride()), shape, layout))

    v_block = [head_dim, block_n] if constexprs.get("FP8") else [block_n, head_dim]
    types = {"O": "*bf16", "LSE": "*fp32", "qk_scale": "fp32", "MASK_BITS": "*i64", "DESCALE": "*fp32",
             "q_desc": desc([q_rows, head_dim]), "k_desc": desc([block_n, head_dim]), "v_desc": desc(v_block),
             **{n: "*i32" for n in ("U_COUNT", "U_UNMASKED", "U_INDEX", "U_ENTRY")}}
    # the kernel's constexpr options left at their defaults unless given
    constexprs = {**{n: False for n in ("FP8", "OVERLAP") if n in kernel.arg_names}, **constexprs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    compiled = triton_compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=constexprs["num_warps"], maxnreg=maxnreg))
    ptx = compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0
    assert "wgmma.mma_async" in ptx  # Hopper tensor cores
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    assert "setmaxnreg" in ptx  # warp specialization: the loader's registers go to the consumers
    assert compiled.metadata.shared <= 227 * 1024
    return compiled


def ptxas_report(ptx: str, tmp_path) -> dict:
    """What ptxas (Triton's own, for sm_90a) says of a kernel's PTX: bytes of register spills, and whether it
    had to serialize the wgmmas (warning C7514: registers of a running wgmma read by other instructions)."""
    import re
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    (tmp_path / "kernel.ptx").write_text(ptx)
    done = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(tmp_path / "kernel.ptx"), "-o",
                           str(tmp_path / "kernel.cubin")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills, log[-2000:]
    return {"spill_bytes": sum(spills), "wgmma_serialized": "C7514" in log}


@needs_gluon
@pytest.mark.parametrize("head_dim,lse,groups,block_n", [(128, False, 1, 64), (64, True, 1, 64), (128, True, 2, 64),
                                                         (128, False, 2, 128)])
def test_kernel_compiles_for_sm90_warp_specialized(head_dim, lse, groups, block_n):
    stages, maxnreg = gluon_backend.stages_for(groups, block_n), gluon_backend.PROGRAM[groups][1]
    constexprs = dict(BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, GROUPS=groups, STORE_LSE=lse,
                      Q_IN_REGS=True, num_warps=4 * groups)
    compiled = compile_for_sm90(gluon_backend.clear_fwd_ws_kernel, head_dim, BLOCK * groups, block_n, constexprs,
                                maxnreg)
    if (groups, block_n) == (1, 64):
        assert compiled.metadata.shared <= 116 * 1024  # two programs per SM (228 KB)


@needs_gluon
@pytest.mark.parametrize("head_dim,lse", [(128, True), (64, False)])
def test_pingpong_kernel_compiles_for_sm90(head_dim, lse):
    stages, maxnreg = gluon_backend.PINGPONG_PROGRAM
    constexprs = dict(BLOCK_N=BLOCK, HEAD_DIM=head_dim, STAGES=stages, STORE_LSE=lse, num_warps=4, FP8=False)
    compiled = compile_for_sm90(gluon_backend.clear_fwd_pingpong_kernel, head_dim, BLOCK, BLOCK, constexprs, maxnreg)
    # two Q blocks and two rings of K and V (bf16): for head dim 128, one program per SM
    assert compiled.metadata.shared >= 2 * (BLOCK + 2 * stages * BLOCK) * head_dim * 2


@needs_gluon
@pytest.mark.parametrize("fp8,overlap,stages", [(False, False, 3), (False, True, 3), (True, False, 3),
                                                (True, True, 5)])
def test_pingpong_variants_keep_their_registers_and_wgmma_pipeline(fp8, overlap, stages, tmp_path):
    """ptxas's own account of each ping-pong program that runs (FLUX head dim 128, with log-sum-exp): the
    wgmmas stay asynchronous (no C7514) and nothing spills, but for the bf16 overlap variant (two S tiles, a
    few bytes: it is an option to measure, not the default)."""
    _, maxnreg = gluon_backend.PINGPONG_PROGRAM
    constexprs = dict(BLOCK_N=BLOCK, HEAD_DIM=128, STAGES=stages, STORE_LSE=True, num_warps=4, FP8=fp8,
                      OVERLAP=overlap)
    compiled = compile_for_sm90(gluon_backend.clear_fwd_pingpong_kernel, 128, BLOCK, BLOCK, constexprs, maxnreg,
                                dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
    report = ptxas_report(compiled.asm["ptx"], tmp_path)
    assert not report["wgmma_serialized"], report
    assert report["spill_bytes"] <= (16 if overlap and not fp8 else 0), report


@pytest.mark.parametrize("tile,radius,groups,block_n", [((8, 8), 5.0, 1, 64), ((8, 16), 9.5, 2, 64),
                                                        (None, 3.0, 2, 64), ((8, 8), 1.0, 2, 64),
                                                        ((8, 16), 9.5, 1, 128), (None, 40.0, 2, 128),
                                                        ((8, 8), 20.0, 1, 64), ((8, 8), 20.0, 2, 64)])
def test_group_lists_hold_every_visible_block_and_its_mask(tile, radius, groups, block_n):
    h, w = (24, 128) if tile is None else (24, 32)  # raster rows of whole blocks
    lists = group_lists(h, w, tile, radius, torch.device("cpu"), groups, block_n)
    mask = dense_mask(TokenLayout(0, True, h, w, tile), radius)
    cols = torch.arange(block_n)
    words = lists.words.view(lists.words.shape[0], BLOCK, block_n // 64)
    bits = ((words[:, :, cols // 64] >> (cols % 64)) & 1).bool()  # (table rows, query rows, keys)
    kinds = set()
    for program in range(lists.count.numel()):
        listed = lists.index[program, :lists.count[program]].tolist()
        assert len(set(listed)) == len(listed)
        for slot, kb in enumerate(listed):
            masks = [lists.entry[program, slot, g].item() for g in range(groups)]
            assert (slot < lists.unmasked[program]) == all(m == -1 for m in masks)  # unmasked blocks first
            for g, m in enumerate(masks):
                qb = program * groups + g
                want = mask[qb * BLOCK:(qb + 1) * BLOCK, kb * block_n:(kb + 1) * block_n]
                got = torch.ones_like(want) if m == -1 else torch.zeros_like(want) if m == -2 else bits[m]
                assert torch.equal(got, want), (program, kb, g, m)
                kinds.add(min(m, 0))
        for g in range(groups):  # nothing visible is left out
            qb = program * groups + g
            seen = mask[qb * BLOCK:(qb + 1) * BLOCK].view(BLOCK, -1, block_n).any(2).any(0)
            assert set(seen.nonzero().flatten().tolist()) <= set(listed)
    assert 0 in kinds  # table rows used
    if radius == 20.0:  # 8x8 tiles next to each other: wholly visible blocks (listed first, without a mask)
        assert -1 in kinds
    assert -2 in kinds or radius > 1  # r = 1, 8x8 tiles: each tile sees itself only, not its neighbour's block


def test_refusals_name_the_reason():
    q = torch.randn(1, 64 + 16 * 16, 2, 64)
    layout = TokenLayout(64, True, 16, 16, (8, 8))
    assert "CUDA" in gluon_reason(q, q, q, layout, 4) or "Gluon" in gluon_reason(q, q, q, layout, 4)
    reasons = {
        "multiples of 64": TokenLayout(77, True, 16, 16, (8, 8)),
        "one image": TokenLayout(64, True, 16, 16, images=((16, 16),)),
        "tile token layout": TokenLayout(64, True, 8, 40),
    }
    for words, layout in reasons.items():
        assert words in gluon_backend.layout_reason(layout, 4.0, "cpu"), words
    # two query blocks per program need whole 128-row blocks; 128-key blocks need tiles they fill (8x16)
    assert "multiples of 128" in gluon_backend.layout_reason(TokenLayout(64, True, 16, 16, (8, 8)), 4.0, "cpu", 2)
    assert gluon_backend.layout_reason(TokenLayout(128, True, 16, 32, (8, 8)), 4.0, "cpu", 1, 128)
    assert gluon_backend.layout_reason(TokenLayout(128, True, 16, 32, (8, 16)), 4.0, "cpu", 1, 128) is None
    # ping-pong: two 64-row query blocks per program, so an even number of them over batch and heads
    pingpong = gluon_backend.pingpong_reason
    assert pingpong(TokenLayout(64, True, 24, 24, (8, 8)), 3, 1, 64, True, None) is None  # 3 + 9 blocks, 3 heads
    assert "even number" in pingpong(TokenLayout(64, True, 24, 16, (8, 8)), 3, 1, 64, True, None)  # (1 + 6) * 3
    for options in [(2, 64, True, None), (1, 128, True, None), (1, 64, False, None), (1, 64, True, 4)]:
        assert "ping-pong runs" in pingpong(TokenLayout(64, True, 24, 24, (8, 8)), 2, *options)
    with pytest.raises(ValueError, match="queries must be 'all' or 'text', got 'image'"):  # before any other check
        gluon_backend.gluon_clear_attention(q, q, q, layout, 4, queries="image")


# ---- GPU (H200) -------------------------------------------------------------------------------------------------

# (batch, heads, head_dim, text_len, text_first, grid h, grid w, radius, tile)
GPU_CASES = [
    (1, 24, 128, 512, True, 64, 64, 16, (8, 8)),  # FLUX 1024²
    (1, 24, 128, 512, True, 64, 64, 16, (8, 16)),
    (2, 24, 128, 512, False, 64, 64, 8, None),  # batch 2, text last, raster rows of whole blocks
    (1, 8, 128, 256, True, 48, 40, 10, (8, 8)),  # non-square grid
    (1, 8, 128, 64, False, 32, 24, 1, (8, 8)),  # r = 1: every key block partial
    (1, 8, 128, 128, True, 16, 24, 100, (8, 8)),  # r beyond the grid: every key visible
    (2, 6, 64, 128, True, 40, 32, 6.5, (8, 8)),  # head dim 64
    (1, 4, 64, 0, True, 32, 32, 4, (8, 16)),  # no text
    (1, 3, 64, 64, True, 24, 24, 5, (8, 8)),  # ping-pong: a text and an image block share a program
    (1, 3, 64, 64, False, 24, 16, 5, (8, 8)),  # odd number of query blocks: no ping-pong
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"case{i}" for i in range(len(GPU_CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["default", "ping-pong", "ping-pong-overlap", "one-warpgroup",
                                     "two-blocks-per-program", "128-key-blocks", "q-in-shared-memory"])
def test_gpu_gluon_matches_reference(case, dtype, variant):
    b, h, d, text_len, text_first, gh, gw, r, tile = case
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the gluon kernel is for Hopper")
    layout = TokenLayout(text_len, text_first, gh, gw, tile)
    options = {"default": {}, "ping-pong": {"pingpong": True}, "ping-pong-overlap": {"pingpong": True, "overlap": True},
               "one-warpgroup": {"pingpong": False},
               "two-blocks-per-program": {"groups": 2}, "128-key-blocks": {"block_n": 128},
               "q-in-shared-memory": {"q_in_regs": False}}[variant]
    shape = {k: v for k, v in options.items() if k in ("groups", "block_n")}
    if gluon_backend.layout_reason(layout, r, "cuda", **shape):
        pytest.skip(f"not for this layout: {gluon_backend.layout_reason(layout, r, 'cuda', **shape)}")
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(b, layout.seq_len, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    assert BACKENDS["gluon"].can_run(q, k, v, layout, r, raise_error=True)
    if variant.startswith("ping-pong") and gluon_backend.pingpong_reason(layout, b * h, 1, BLOCK, True, None):
        with pytest.raises(ValueError, match="even number"):
            gluon_clear_attention(q, k, v, layout, r, **options)
        return
    poison = torch.full_like(q, float("nan"))  # every element must be written
    out, lse = gluon_clear_attention(q, k, v, layout, r, out=poison, return_lse=True, **options)
    assert out.data_ptr() == poison.data_ptr() and not out.isnan().any()
    refs = [reference_attention(q[i:i + 1].float(), k[i:i + 1].float(), v[i:i + 1].float(), layout, r, return_lse=True)
            for i in range(b)]
    assert rel_err(out, torch.cat([o for o, _ in refs])) < 1e-2
    assert (lse - torch.cat([l for _, l in refs])).abs().max() < 2e-2


@pytest.mark.gpu
def test_gpu_gluon_gradients_and_auto_choice():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the gluon kernel is for Hopper")
    kwargs = dict(text_len=128, text_first=True, height=32, width=40, radius=7, tile=(8, 8))
    q, k, v = (torch.randn(1, 128 + 32 * 40, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = attention(q, k, v, backend="gluon", **kwargs)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    q2, k2, v2 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, TokenLayout(128, True, 32, 40, (8, 8)), 7)
    assert rel_err(out, ref) < 1e-2
    for a, b in zip((dq, dk, dv), torch.autograd.grad(ref, (q2, k2, v2), grad.float())):
        assert rel_err(a, b) < 2e-2
    # a call it cannot take (text not a whole block) goes to another backend under "auto"
    odd = TokenLayout(77, True, 32, 40, (8, 8))
    x = torch.randn(1, odd.seq_len, 4, 128, device="cuda", dtype=torch.bfloat16)
    assert not BACKENDS["gluon"].can_run(x, x, x, odd, 7)
