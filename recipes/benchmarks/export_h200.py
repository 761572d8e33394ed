"""Engines on an H200: the TensorRT plugin's AOT kernel launched as TensorRT would, and an AOTInductor
package of a FLUX.1-dev-shaped CLEAR model (random bf16 weights, r = 16, tile layout).

    python recipes/benchmarks/export_h200.py kernel --out OUT     # AOT launch vs the triton backend
    python recipes/benchmarks/export_h200.py aoti --out OUT       # .pt2 vs eager vs torch.compile
    python recipes/benchmarks/export_h200.py aoti --tiny --out OUT  # the same on a toy model (smoke run)
    python recipes/benchmarks/export_h200.py aoti --layers 2,4 --out OUT  # FLUX.1-dev's widths, 2 + 4 blocks
    python recipes/benchmarks/export_h200.py aoti --attention registered --work /tmp/aoti --out OUT  # full depth,
        # the package kept in /tmp/aoti: a second call on the same machine loads it instead of building it again

kernel: FLUX shapes (24 heads x 128, 512 text tokens) at 4096 px (256 x 256 tokens) and 8192 px, r = 16,
text first and last: the PTX, grid and arguments of ``tensorrt_plugin.aot_launch`` for every tactic,
JIT-loaded and launched through the CUDA driver (cupy) with TensorRT's ten arguments, against the
table-driven triton backend (rel. error), timed beside the triton, gluon and triton-aot backends.
aoti: the model exported for 2048..4096 px, compiled into model.pt2, loaded in a fresh process, run at
2048 px and 4096 px against eager, and at 4096 px with guidance 4 (FLUX rounds guidance * 1000 to bf16
eagerly, which Inductor fuses away: 4000 is a bf16 number, 3500 is not). Two packages, one after the other:
"embedded" (the self-contained Triton kernel compiled in) and "registered" (calls of clear::attention on
backend "auto", the Gluon kernel on Hopper). The 4096 px step timed for each package, and for eager and
torch.compile on the triton backend (whose kernel the embedded package's is a self-contained copy of) and on
"auto" (what a user's converted model runs by default), each beside its package, all in the same run. Each
output's error is also given for the exported graph run uncompiled, torch.compile, and (--float32) against
the float32 eager model, to tell where a difference comes from. OUT/aoti.json grows as the run goes (a run
cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
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
from clear_surgery.export.aoti import load_package  # registers clear::attention (registered packages call it)
runner = load_package(sys.argv[1])
tag, results = sys.argv[3], {}
for name in sys.argv[4:]:
    inputs = {k: v.cuda() for k, v in torch.load(f"{sys.argv[2]}/inputs-{name}.pt", weights_only=True).items()}
    out = runner(**inputs)
    torch.save(out.cpu(), f"{sys.argv[2]}/{tag}-{name}.pt")
    if name == "4096":
        runner(**inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); runner(**inputs); e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        results[f"{tag}_ms_4096"] = sorted(times)[1]
print(json.dumps(results))
"""


def aoti_rows(out: Path, tiny: bool, layers: str | None = None, attentions=("embedded", "registered"),
              float32: bool = False, work: Path | None = None) -> dict:
    def checkpoint(report):  # printed and written as it grows: a run cut short keeps what it measured
        print(json.dumps(report), flush=True)
        (out / "aoti.json").write_text(json.dumps(report, indent=1) + "\n")

    from clear_surgery.export.aoti import export_aoti, exported_program
    from clear_surgery.export.common import prepare
    from clear_surgery.plugins.op import self_contained_attention
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
    plan, wrapper = prepared.plan, prepared.wrapper
    inputs = {}
    for side in (2048, 4096):
        inputs[side] = plan.inputs(model, 512, side // 16, side // 16, 1, torch.bfloat16, "cuda")
    # guidance 4: 4000 is a bf16 number, so eager's rounding of guidance * 1000 (3.5 -> 3504) is not in play
    inputs["4096-g4"] = dict(inputs[4096], guidance=torch.full_like(inputs[4096]["guidance"], 4.0))
    for side, x in inputs.items():
        torch.save({k: v.cpu() for k, v in x.items()}, out / f"inputs-{side}.pt")
    packaged = {}
    try:
        with torch.no_grad():
            eager = {side: wrapper(**x).float().cpu() for side, x in inputs.items()}
        for attention in attentions:  # each package: exported, compiled, loaded and timed in a fresh process
            # the embedded package copies the triton backend's kernel; a registered one calls the op with the
            # backend baked into the graph: "auto" (the Gluon kernel on Hopper), as a user's converted model has
            set_backend(model, "triton" if attention == "embedded" else "auto")
            folder = (work or out) / attention
            folder.mkdir(parents=True, exist_ok=True)
            package, built = folder / "model.pt2", folder / "build.json"
            if work and built.exists() and package.exists():  # kept by an earlier call: same seed, same weights
                report.update(json.loads(built.read_text()), **{f"{attention}_package_reused": True})
            else:
                t0 = time.perf_counter()
                program = exported_program(prepared, attention)
                fields = {f"cxx_{attention}": export_aoti(prepared, folder, program, attention)["cxx"],
                          f"{attention}_export_and_compile_s": round(time.perf_counter() - t0, 1),
                          f"{attention}_package_gib": round(package.stat().st_size / 2**30, 2)}
                report.update(fields)
                if work:
                    built.write_text(json.dumps(fields))
                if attention == "embedded":
                    with torch.no_grad(), self_contained_attention():  # the graph uncompiled: its own error
                        graph = program.module()
                        for side, x in inputs.items():
                            report[f"exported_graph_vs_eager_rel_err_{side}"] = rel_err(graph(**x).float().cpu(),
                                                                                        eager[side])
                        del graph
                del program
            gc.collect()
            torch.cuda.empty_cache()  # at full depth the loading process needs another 22 GiB of the GPU
            checkpoint(report)
            done = subprocess.run([sys.executable, "-c", PROBE, str(package), str(out), attention,
                                   *map(str, inputs)], capture_output=True, text=True, timeout=900)
            if not work:
                package.unlink()
            if done.returncode != 0:
                report[f"{attention}_error"] = f"exit {done.returncode}: " + done.stderr[-3000:]
                print(report[f"{attention}_error"], flush=True)
                continue
            report.update(json.loads(done.stdout.splitlines()[-1]))
            for side in inputs:
                packaged[attention, side] = torch.load(out / f"{attention}-{side}.pt", weights_only=True).float()
                report[f"{attention}_vs_eager_rel_err_{side}"] = rel_err(packaged[attention, side], eager[side])
            checkpoint(report)
        # eager and torch.compile in the same run, on each package's backend (embedded: the triton backend's kernel)
        for backend in sorted({"embedded": "triton", "registered": "auto"}[a] for a in attentions):
            set_backend(model, backend)
            torch._dynamo.reset()
            compiled = torch.compile(wrapper)
            with torch.no_grad():
                report[f"eager_{backend}_ms_4096"] = ms(lambda: wrapper(**inputs[4096]))
                t0 = time.perf_counter()
                compiled(**inputs[4096])
                torch.cuda.synchronize()
                report[f"compile_{backend}_first_call_s"] = round(time.perf_counter() - t0, 1)
                report[f"compiled_{backend}_ms_4096"] = ms(lambda: compiled(**inputs[4096]))
                for side in (4096, "4096-g4"):
                    report[f"compiled_{backend}_vs_eager_rel_err_{side}"] = rel_err(
                        compiled(**inputs[side]).float().cpu(), eager[side])
            checkpoint(report)
        if float32:
            with torch.no_grad():
                # which of them rounds more: each against the float32 eager model (same weights, widened; the Triton
                # kernel takes bf16 and fp16 only, so "auto" picks a float32 backend)
                model.float()
                set_backend(model, "auto")
                for side, x in inputs.items():
                    truth = wrapper(**{k: v.float() if v.is_floating_point() else v for k, v in x.items()}).cpu()
                    report[f"eager_bf16_vs_float32_rel_err_{side}"] = rel_err(eager[side], truth)
                    for attention in attentions:
                        if (attention, side) in packaged:
                            report[f"{attention}_vs_float32_rel_err_{side}"] = rel_err(packaged[attention, side],
                                                                                       truth)
        report["total_s"] = round(time.perf_counter() - started, 1)
    finally:  # too large to bring back, also when the run is cut short
        for name in [f"{a}/model.pt2" for a in attentions if not work] + [
                f"{p}-{s}.pt" for p in ("inputs", *attentions) for s in inputs]:
            (out / name).unlink(missing_ok=True)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kernel", "aoti"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", help="aoti: DOUBLE,SINGLE blocks instead of FLUX.1-dev's 19,38 (same widths)")
    parser.add_argument("--attention", default="embedded,registered",
                        help="aoti: the packages to build, by where their attention runs (export --aoti-attention)")
    parser.add_argument("--float32", action="store_true", help="aoti: also each output against the float32 model")
    parser.add_argument("--work", type=Path, help="aoti: keep each package in WORK/<attention>/ and reuse it when "
                        "there (full depth: build in one device call, measure in the next on the same machine)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops it: clean up on the way out
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.what == "kernel":
        result = {**meta, "rows": kernel_rows(args.out)}
    else:
        result = {**meta, **aoti_rows(args.out, args.tiny, args.layers, tuple(args.attention.split(",")), args.float32,
                                         args.work)}
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
