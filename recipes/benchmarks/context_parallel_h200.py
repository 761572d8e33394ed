"""diffusers' own context parallelism (ring or Ulysses attention over the whole sequence) on the dense
FLUX.1-dev-shaped transformer (random bf16 weights, 512 text tokens): one step on one GPU and on all
the GPUs of the launch, beside patch_parallel_h200.py's CLEAR numbers.

    torchrun --standalone --nproc_per_node 2 recipes/benchmarks/context_parallel_h200.py --mode ring --out OUT
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from clear_surgery.surgery.tools.launch import init_from_torchrun
from clear_surgery.surgery.tools.bench import build_flux_dev, flux_inputs, time_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4096")
    parser.add_argument("--mode", choices=("ring", "ulysses"), default="ring")
    parser.add_argument("--backend", default="_native_cudnn")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    init_from_torchrun()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_flux_dev(torch.device("cuda", torch.cuda.current_device()))
    model.set_attention_backend(args.backend)
    sizes = list(map(int, args.sizes.split(",")))
    rows = []
    with torch.no_grad():
        for size in sizes:  # one GPU first, on rank 0
            torch.manual_seed(0)
            inputs = flux_inputs(model, size)
            row = {"res": size, "mode": args.mode, "world": world, "backend": args.backend,
                   "gpu": torch.cuda.get_device_name()}
            if rank == 0:
                row["one_gpu_dense_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=2)
            rows.append(row)
            dist.barrier()
        degree = {"ring_degree": world} if args.mode == "ring" else {"ulysses_degree": world}
        model.enable_parallelism(config=ContextParallelConfig(**degree))
        for size, row in zip(sizes, rows):
            torch.manual_seed(0)
            inputs = flux_inputs(model, size)
            for value in inputs.values():
                if isinstance(value, torch.Tensor):
                    dist.broadcast(value, 0)
            row["parallel_dense_ms"] = time_ms(lambda: model(**inputs), warmup=1, rep=2)
            if rank == 0:
                row["speedup"] = row["one_gpu_dense_ms"] / row["parallel_dense_ms"]
                print(json.dumps(row), flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"context_parallel_{args.mode}_{world}gpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
