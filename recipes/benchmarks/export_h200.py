"""Engines on an H200: the TensorRT plugin's AOT kernel launched as TensorRT would, and an AOTInductor
package of a FLUX.1-dev-shaped CLEAR model (random bf16 weights, r = 16, tile layout).

    python recipes/benchmarks/export_h200.py kernel --out OUT     # AOT launch vs the triton backend
    python recipes/benchmarks/export_h200.py aoti --out OUT       # .pt2 vs eager vs torch.compile
    python recipes/benchmarks/export_h200.py aoti --tiny --out OUT  # the same on a toy model (smoke run)
    python recipes/benchmarks/export_h200.py aoti --layers 2,4 --out OUT  # FLUX.1-dev's widths, 2 + 4 blocks

kernel: FLUX shapes (24 heads x 128, 512 text tokens) at 4096 px (256 x 256 tokens) and 8192 px, r = 16,
text first and last: the PTX, grid and arguments of ``tensorrt_plugin.aot_launch`` for every tactic,
JIT-loaded and launched through the CUDA driver (cupy) with TensorRT's ten arguments, against the
table-driven triton backend (rel. error), timed beside the triton, gluon and triton-aot backends.
aoti: the model exported for 2048..4096 px, compiled into model.pt2, loaded in a fresh process, run at
2048 px and 4096 px against eager, and at 4096 px with guidance 4 (FLUX rounds guidance * 1000 to bf16
eagerly, which Inductor fuses away: 4000 is a bf16 number, 3500 is not); the 4096 px step timed for eager,
torch.compile and the package (eager and compiled on the triton backend, whose kernel the package's is a
self-contained copy of; then both again on "auto", the Gluon kernel on Hopper, what a user's model runs by
default; the package holds the self-contained Triton kernel only). Each output's error is also given for the exported graph run uncompiled,
torch.compile, and against the float32 eager model, to tell where a difference comes from. OUT/aoti.json
grows as the run goes (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))


def ms(fn, warmup=1, rep=3) -> float:
    from clear_surgery.surgery.tools.bench import time_ms

    return time_ms(fn, warmup, rep)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def kernel_rows(out: Path) -> list[dict]:
    """Per size and text order: the engine's launch (its PTX JIT-loaded by the driver, TensorRT's ten
    arguments) for every tactic against the triton backend, and the time of each beside the triton, gluon and
    triton-aot backends on the same inputs."""
    import cupy
    import numpy as np
    from test_triton_aot import launch_as_tensorrt_would

    from clear_surgery.plugins import TokenLayout
    from clear_surgery.plugins.gluon_backend import gluon_clear_attention
    from clear_surgery.plugins.tensorrt_plugin import aot_launch, tactics
    from clear_surgery.plugins.triton_aot import aot_tile, triton_aot_attention
    from clear_surgery.plugins.triton_backend import triton_clear_attention

    rows = []
    for side in (256, 512):
        for text_first in (True, False):
            gen = torch.Generator(device="cuda").manual_seed(side)
            q, k, v = (torch.randn(1, 512 + side * side, 24, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for _ in range(3))
            layout = TokenLayout(512, text_first, side, side, aot_tile(128))
            want = triton_clear_attention(q, k, v, layout, 16)
            row = {"res": side * 16, "text_first": text_first,
                   "triton_ms": ms(lambda: triton_clear_attention(q, k, v, layout, 16), 2, 5),
                   "gluon_ms": ms(lambda: gluon_clear_attention(q, k, v, layout, 16), 2, 5),
                   "gluon_rel_err_vs_triton": rel_err(gluon_clear_attention(q, k, v, layout, 16), want),
                   "triton_aot_ms": ms(lambda: triton_aot_attention(q, k, v, layout, 16), 2, 5)}
            for tactic in tactics()[0].tactics:
                got = torch.full_like(q, float("nan"))
                launch_as_tensorrt_would(q, k, v, got, (side, side), 16.0, text_first, tactic)
                row[f"engine_t{tactic}_rel_err_vs_triton"] = rel_err(got, want)
                row[f"engine_t{tactic}_nan"] = bool(got.isnan().any())
                fields = {"radius": 16.0, "text_first": int(text_first), "tile_h": 8, "tile_w": 8, "scale": 0.0}
                name, ptx, plan, shared = aot_launch(tuple(q.shape), (side, side), "bf16", fields, tactic)
                module = cupy.cuda.function.Module()
                module.load(ptx.encode())
                function = module.get_function(name)
                carrier = torch.empty((side, side), device="cuda", dtype=q.dtype)
                args = (*(np.uint64(t.data_ptr()) for t in (q, k, v, carrier)), *(np.int32(x) for x in plan.scalars),
                        np.uint64(got.data_ptr()))
                row[f"engine_t{tactic}_ms"] = ms(lambda: function(plan.grid, plan.block, args, shared_mem=shared), 2, 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, v, want, got
            torch.cuda.empty_cache()
    return rows


PROBE = """
import faulthandler, json, sys, time, torch
faulthandler.enable()
from torch._inductor import aoti_load_package
runner = aoti_load_package(sys.argv[1])
results = {}
for name in sys.argv[3:]:
    inputs = {k: v.cuda() for k, v in torch.load(f"{sys.argv[2]}/inputs-{name}.pt", weights_only=True).items()}
    out = runner(**inputs)
    torch.save(out.cpu(), f"{sys.argv[2]}/aoti-{name}.pt")
    if name == "4096":
        for _ in range(1):
            runner(**inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); runner(**inputs); e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        results["aoti_ms_4096"] = sorted(times)[1]
print(json.dumps(results))
"""


def aoti_rows(out: Path, tiny: bool, layers: str | None = None) -> dict:
    def checkpoint(report):  # printed and written as it grows: a run cut short keeps what it measured
        print(json.dumps(report), flush=True)
        (out / "aoti.json").write_text(json.dumps(report, indent=1) + "\n")

    from clear_surgery.export.aoti import export_aoti, exported_program
    from clear_surgery.plugins.op import self_contained_attention
    from clear_surgery.export.common import prepare
    from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, set_backend
    from clear_surgery.surgery.tools.bench import FLUX_DEV, TINY_FLUX_DEV, analyze_flux_dev, build_flux_dev

    config = TINY_FLUX_DEV if tiny else FLUX_DEV
    if layers:  # FLUX.1-dev's widths at another depth: double-stream,single-stream blocks
        double, single = (int(n) for n in layers.split(","))
        config = dict(config, num_layers=double, num_single_layers=single)
    sizes = {"min": "2048x2048", "opt": "4096x4096", "max": "4096x4096"}
    report = {"model": "tiny FLUX.1-dev architecture" if tiny else "FLUX.1-dev-shaped, random bf16 weights",
              "blocks": [config["num_layers"], config["num_single_layers"]]}
    started = time.perf_counter()
    model = build_flux_dev("cuda", torch.bfloat16, config)
    apply_clear(model, ClearConfig(radius=16, token_layout="tiled"), backend="triton", analysis=analyze_flux_dev(config),
                verify=False)
    prepared = prepare(model, sizes, dtype=None, text_len=512, kernel_tile=True, device="cuda")
    report["tile"] = get_clear_state(model).runtime.tile
    plan = prepared.plan
    inputs = {}
    for side in (2048, 4096):
        inputs[side] = plan.inputs(model, 512, side // 16, side // 16, 1, torch.bfloat16, "cuda")
    # guidance 4: 4000 is a bf16 number, so eager's rounding of guidance * 1000 (3.5 -> 3504) is not in play
    inputs["4096-g4"] = dict(inputs[4096], guidance=torch.full_like(inputs[4096]["guidance"], 4.0))
    for side, x in inputs.items():
        torch.save({k: v.cpu() for k, v in x.items()}, out / f"inputs-{side}.pt")
    try:
        t0 = time.perf_counter()
        program = exported_program(prepared)
        report["cxx"] = export_aoti(prepared, out, program)["cxx"]
        report["export_and_compile_s"] = round(time.perf_counter() - t0, 1)
        report["package_gib"] = round((out / "model.pt2").stat().st_size / 2**30, 2)
        checkpoint(report)
        wrapper = prepared.wrapper
        eager = {}
        with torch.no_grad():
            for side, x in inputs.items():
                eager[side] = wrapper(**x).float().cpu()
            report["eager_ms_4096"] = ms(lambda: wrapper(**inputs[4096]))
            with self_contained_attention():  # the exported graph run uncompiled: its own error, apart from Inductor's
                graph = program.module()
                for side, x in inputs.items():
                    report[f"exported_graph_vs_eager_rel_err_{side}"] = rel_err(graph(**x).float().cpu(), eager[side])
            del graph
        checkpoint(report)
        packaged = {}
        done = subprocess.run([sys.executable, "-c", PROBE, str(out / "model.pt2"), str(out), *map(str, inputs)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            report["aoti_error"] = f"exit {done.returncode}: " + done.stderr[-3000:]
            print(report["aoti_error"], flush=True)
        else:
            report.update(json.loads(done.stdout.splitlines()[-1]))
            for side in inputs:
                packaged[side] = torch.load(out / f"aoti-{side}.pt", weights_only=True).float()
                report[f"aoti_vs_eager_rel_err_{side}"] = rel_err(packaged[side], eager[side])
        checkpoint(report)
        compiled = torch.compile(wrapper)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(**inputs[4096])
            torch.cuda.synchronize()
            report["compile_first_call_s"] = round(time.perf_counter() - t0, 1)
            report["compiled_ms_4096"] = ms(lambda: compiled(**inputs[4096]))
            for side in (4096, "4096-g4"):
                got = compiled(**inputs[side]).float().cpu()
                report[f"compiled_vs_eager_rel_err_{side}"] = rel_err(got, eager[side])
        checkpoint(report)
        # what a user's compiled model runs by default: backend "auto" (on Hopper the Gluon kernel; the package
        # holds the self-contained Triton kernel only), eager and compiled, same inputs
        set_backend(model, "auto")
        torch._dynamo.reset()
        compiled = torch.compile(wrapper)
        with torch.no_grad():
            report["eager_auto_ms_4096"] = ms(lambda: wrapper(**inputs[4096]))
            compiled(**inputs[4096])
            report["compiled_auto_ms_4096"] = ms(lambda: compiled(**inputs[4096]))
            report["compiled_auto_vs_eager_rel_err_4096-g4"] = rel_err(compiled(**inputs["4096-g4"]).float().cpu(),
                                                                      eager["4096-g4"])
        checkpoint(report)
        with torch.no_grad():
            # which of them rounds more: each against the float32 eager model (same weights, widened; the Triton
            # kernel takes bf16 and fp16 only, so "auto" picks a float32 backend)
            model.float()
            set_backend(model, "auto")
            for side, x in inputs.items():
                truth = wrapper(**{k: v.float() if v.is_floating_point() else v for k, v in x.items()}).cpu()
                report[f"eager_bf16_vs_float32_rel_err_{side}"] = rel_err(eager[side], truth)
                if side in packaged:
                    report[f"aoti_vs_float32_rel_err_{side}"] = rel_err(packaged[side], truth)
        report["total_s"] = round(time.perf_counter() - started, 1)
    finally:  # too large to bring back, also when the run is cut short
        for name in ["model.pt2"] + [f"{p}-{s}.pt" for p in ("inputs", "aoti") for s in inputs]:
            (out / name).unlink(missing_ok=True)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernel", "aoti"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", help="aoti: DOUBLE,SINGLE blocks instead of FLUX.1-dev's 19,38 (same widths)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops it: clean up on the way out
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.what == "kernel":
        result = {**meta, "rows": kernel_rows(args.out)}
    else:
        result = {**meta, **aoti_rows(args.out, args.tiny, args.layers)}
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
