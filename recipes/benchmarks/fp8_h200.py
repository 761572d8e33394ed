"""FP8 on a Hopper GPU: the layer table and the FLUX.1-dev-shaped step table, one mode per call (each fits in
one 10-minute device call).

    python recipes/benchmarks/fp8_h200.py layer [--backends gluon-tiled,gluon-fp8-tiled] --out OUT
        FLUX shapes (24 heads x 128, 512 text tokens), r16, 4096² and 8192²: cuDNN dense bf16, flex-raster
        (the official path), triton, gluon (ping-pong bf16), gluon-fp8, and both ping-pong kernels' overlap
        variant (gluon-overlap, gluon-fp8-overlap with 5 stages), gluon-fp8 with its text rows on a second
        stream (gluon-fp8-concurrent); the parts of an FP8 call alone (its text rows, the quantization); and
        gluon-fp8's error against float32 on a 1024² slice of heads (its accuracy at the benchmark's shapes).
    python recipes/benchmarks/fp8_h200.py step --size 4096 [--compile [regional]] [--no-dense] [--configs KEYS] \
        --out OUT
        one step of a FLUX.1-dev-shaped transformer (random weights): dense bf16, CLEAR r16 bf16, CLEAR + FP8
        attention; then the linear layers in FP8 (torchao, in place): dense + FP8 linear, CLEAR + FP8 linear,
        CLEAR + FP8 linear + FP8 attention. Each: ms, the GPU memory held before the step (weights and
        inputs) and its peak. --compile compiles the whole model (each row's first call ~2 minutes at full depth);
        --compile regional compiles each repeated block (diffusers' compile_repeated_blocks: two graphs, one per
        block class, shared by every block), meant to fit a whole table into one 10-minute call (not run yet).
Writes OUT/fp8_layer.json or OUT/fp8_step_<size>[_compiled|_regional].json (rows also printed as JSON lines).
"""
import argparse
import gc
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clear_surgery.plugins import TokenLayout, reference_attention
from clear_surgery.plugins.fp8_quantize import quantize_heads
from clear_surgery.plugins.gluon_backend import gluon_clear_attention
from clear_surgery.plugins.gluon_fp8_backend import gluon_fp8_clear_attention
from clear_surgery.surgery import ClearConfig, apply_clear, remove_clear, set_backend
from clear_surgery.surgery.tools.bench import (analyze_flux_dev, bench_attention, build_flux_dev, compiled_for_timing,
                                               flux_inputs, time_ms)
from clear_surgery.surgery.tools.quantize import quantize_linear_layers

DENSE_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def emit(rows, row):
    rows.append(row)
    print(json.dumps(row), flush=True)


LAYER_ROWS = ["dense-cudnn", "flex-raster", "triton-tiled", "gluon-tiled", "gluon-overlap-tiled", "gluon-fp8-tiled",
              "gluon-fp8-overlap-tiled", "gluon-fp8-concurrent-tiled"]


def layer(out: Path, backends: list[str]):
    rows = bench_attention([4096, 8192], [16], backends)
    # the parts of an FP8 call, each launched alone: its text rows (the bf16 kernel), the quantization of Q, K, V
    for size in (4096, 8192):
        side = size // 16
        layout = TokenLayout(512, True, side, side, (8, 8))
        q, k, v = (torch.randn(1, layout.seq_len, 24, 128, device="cuda").to(torch.bfloat16) for _ in range(3))
        rows.append(dict(res=size, part="text rows alone (bf16 ping-pong kernel)", ms=time_ms(
            lambda: gluon_clear_attention(q, k, v, layout, 16, queries="text"), warmup=2, rep=5)))
        rows.append(dict(res=size, part="quantize Q, K and V (V transposed)", ms=time_ms(
            lambda: (quantize_heads(q), quantize_heads(k), quantize_heads(v, transposed=True)), warmup=2, rep=5)))
        del q, k, v
    # accuracy at the benchmark's shapes: a 1024² call (64x64 tokens, 512 text), 24 heads, against float32
    layout = TokenLayout(512, True, 64, 64, (8, 8))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 24, 128, device="cuda", generator=gen).to(torch.bfloat16)
               for _ in range(3))
    exact = reference_attention(q.float(), k.float(), v.float(), layout, 16)
    fp8 = gluon_fp8_clear_attention(q, k, v, layout, 16)
    rows.append(dict(accuracy="gluon-fp8 vs float32, 1024² r16, 24 heads, randn inputs",
                     relative_rms_error=((fp8.float() - exact).norm() / exact.norm()).item()))
    for row in rows:
        print(json.dumps(row), flush=True)
    (out / "fp8_layer.json").write_text(json.dumps(rows, indent=1))


# --configs keys of the step table's rows, in the order they run
STEP_CONFIGS = {"dense-eager": "dense bf16 eager", "dense": "dense bf16", "clear": "CLEAR bf16", "clear-fp8attn": "CLEAR + FP8 attention",
                "dense-fp8lin": "dense + FP8 linear", "clear-fp8lin": "CLEAR + FP8 linear",
                "clear-fp8lin-fp8attn": "CLEAR + FP8 linear + FP8 attention"}


def step(out: Path, size: int, compiled: str | None, dense: bool, configs: list[str] | None = None):
    report = analyze_flux_dev()
    model = build_flux_dev("cuda")
    inputs = flux_inputs(model, size)
    rows = []
    name = f"fp8_step_{size}{'_' + compiled.replace('full', 'compiled') if compiled else ''}.json"

    def measure(label, clear: bool, fp8_attention: bool = False, linear: str = "bf16", eager: bool = False):
        if configs and label not in [STEP_CONFIGS[key] for key in configs]:
            return  # (a compiled row's first call compiles for ~2 minutes: the table is split over calls)
        if clear:
            apply_clear(model, ClearConfig(radius=16, token_layout="tiled"), analysis=report, verify=False)
            set_backend(model, "auto", fp8_attention=fp8_attention)
        run = compiled_for_timing(model, None if eager else compiled)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30  # the weights (and inputs) before the step
        start = time.perf_counter()
        with torch.no_grad(), sdpa_kernel(DENSE_SDPA, set_priority=True):
            run(**inputs)  # warm-up (and compilation)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            huge = size >= 8192 and not clear
            ms = time_ms(lambda: run(**inputs), warmup=0, rep=1 if huge else 2)
        emit(rows, dict(res=size, config=label, attention="clear r16" if clear else "dense", linear=linear,
                        fp8_attention=fp8_attention, compiled=None if eager else compiled, ms=ms, first_run_s=first_s,
                        resident_gib=resident, peak_gib=torch.cuda.max_memory_allocated() / 2**30))
        (out / name).write_text(json.dumps(rows, indent=1))  # as it grows: a run cut short keeps what it measured
        if clear:
            remove_clear(model)

    if dense:
        if compiled:  # the goals' baseline: what a user runs without CLEAR or FP8
            measure("dense bf16 eager", False, eager=True)
        measure("dense bf16", False)
    measure("CLEAR bf16", True)
    measure("CLEAR + FP8 attention", True, fp8_attention=True)
    quantize_linear_layers(model, "fp8")
    if dense:
        measure("dense + FP8 linear", False, linear="fp8")
    measure("CLEAR + FP8 linear", True, linear="fp8")
    measure("CLEAR + FP8 linear + FP8 attention", True, fp8_attention=True, linear="fp8")
    by = {r["config"]: r["ms"] for r in rows}
    for row in rows:
        for base in ("dense bf16 eager", "dense bf16", "dense + FP8 linear"):
            if base in by:
                row[f"x vs {base}"] = by[base] / row["ms"]
    (out / name).write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["layer", "step"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--compile", nargs="?", const="full", choices=["full", "regional"],
                        help="torch.compile the whole model (full, the default) or each repeated block (regional)")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--configs", help="step: only these rows, comma-separated keys of " + ", ".join(STEP_CONFIGS))
    parser.add_argument("--backends", default=",".join(LAYER_ROWS), help="layer: the rows to time (comma-separated)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "layer":
        layer(args.out, args.backends.split(","))
    else:
        configs = args.configs.split(",") if args.configs else None
        unknown = sorted(set(configs or ()) - set(STEP_CONFIGS))
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(STEP_CONFIGS)}")
        step(args.out, args.size, args.compile, not args.no_dense, configs)
