"""Patch-parallel CLEAR: a FLUX.1-dev-shaped transformer step (random bf16 weights, 512 text tokens,
r = 16, triton backend; raster and tile token layouts) on one GPU and split by image rows over all the
GPUs of the launch; the same inputs on every rank; the outputs compared (bf16).

    torchrun --standalone --nproc_per_node 2 recipes/benchmarks/patch_parallel_h200.py --out OUT

Rank 0 first times the step alone (one GPU, the same kernel, no patch parallelism), then every rank
runs the patch-parallel step (raster, then tile layout); one raster patch-parallel step is broken down
by category with the torch profiler (halo exchange, text merge, attention, GEMMs)."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from clear_surgery.surgery import ClearConfig, apply_clear, enable_patch_parallel, remove_clear
from clear_surgery.surgery.core.patch_parallel import disable_patch_parallel
from clear_surgery.surgery.tools.launch import init_from_torchrun
from clear_surgery.surgery.tools.bench import analyze_flux_dev, build_flux_dev, flux_inputs, time_ms


def profile_categories(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = ("nccl (halo exchange + text merge + gather)" if "nccl" in name else
                "CLEAR attention (triton)" if "clear_fwd" in name else
                "text queries (flex)" if "flex" in name or "triton_tem" in name else
                "GEMMs" if "gemm" in name or "cutlass" in name or "sm90" in name or "nvjet" in name else "other")
        totals[kind] = totals.get(kind, 0.0) + event.device_time_total / 1e3
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4096,8192")
    parser.add_argument("--radius", type=float, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_from_torchrun()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    report = analyze_flux_dev()
    model = build_flux_dev(device)
    rows = []
    for size in map(int, args.sizes.split(",")):
        torch.manual_seed(0)
        inputs = flux_inputs(model, size)
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                dist.broadcast(value, 0)  # the same call on every rank
        row = {"res": size, "radius": args.radius, "world": world, "gpu": torch.cuda.get_device_name()}
        with torch.no_grad():
            if rank == 0:
                apply_clear(model, ClearConfig(radius=args.radius, token_layout="tiled"), backend="triton",
                            analysis=report, verify=False)
                row["one_gpu_tiled_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=3)
                tiled = model(**inputs)[0]  # the same model and inputs, another order of the same sums
                remove_clear(model)
            apply_clear(model, ClearConfig(radius=args.radius), backend="triton", analysis=report, verify=False)
            if rank == 0:
                single = model(**inputs)[0]
                row["one_gpu_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=3)
            dist.barrier()
            enable_patch_parallel(model)
            parallel = model(**inputs)[0]
            row["parallel_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=3)
            row["parallel_breakdown_ms"] = profile_categories(lambda: model(**inputs))
            disable_patch_parallel(model)
            remove_clear(model)
            # the same with the tile token layout (bands and halos in whole tile rows)
            apply_clear(model, ClearConfig(radius=args.radius, token_layout="tiled"), backend="triton",
                        analysis=report, verify=False)
            enable_patch_parallel(model)
            parallel_tiled = model(**inputs)[0]
            row["parallel_tiled_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=3)
            disable_patch_parallel(model)
            remove_clear(model)
        if rank == 0:
            row["speedup_tiled"] = row["one_gpu_tiled_ms"] / row["parallel_tiled_ms"]
            row["tiled_rel_err"] = ((parallel_tiled.float() - tiled.float()).norm() / tiled.float().norm()).item()
            row["speedup"] = row["one_gpu_ms"] / row["parallel_ms"]
            row["speedup_vs_one_gpu_tiled"] = row["one_gpu_tiled_ms"] / row["parallel_ms"]
            diff = (parallel.float() - single.float())
            row["max_abs_diff"] = diff.abs().max().item()
            row["rel_err"] = (diff.norm() / single.float().norm()).item()
            # bf16 noise floor: one GPU, tile layout against raster layout (the same attention, summed in
            # another order)
            row["one_gpu_tiled_vs_raster_rel_err"] = ((tiled.float() - single.float()).norm() / single.float().norm()).item()
            print(json.dumps(row), flush=True)
            rows.append(row)
            del single, tiled
        parallel = parallel_tiled = None
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"patch_parallel_{world}gpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
