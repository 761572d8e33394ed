"""Real-size checkpoints on a CPU machine: a FLUX.1-dev-sized folder (the real architecture, random
bf16 weights, 22 GiB in 5 shards, written shard by shard), then each conversion as a user runs it,
timed, with the peak resident memory of its process (GNU time's maximum resident set size):

    python recipes/benchmarks/real_size.py --work /work/real-size [--out recipes/benchmarks/real-size]

Measured: a plain copy of the folder (cp -r), zero-shot convert (hard links; and --no-link, streamed
copies), --clear-layers (a random CLEAR-layers file of the official tensors: to_q/to_k/to_v/to_out of
every block), --dtype fp16, --format layers, push-to-hub --dry-run, and loading the zero-shot result
with load_converted and with stock diffusers. Outputs are deleted after each step (disk); results go
to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from clear_surgery.hub.checkpoint import weight_files
from clear_surgery.hub.safetensors_io import read_header, read_tensor, write_file
from clear_surgery.surgery.tools.bench import FLUX_DEV, write_random_checkpoint

GIB = 2**30
CLI = [sys.executable, "-m", "clear_surgery.surgery.cli"]


def run(args: list[str]) -> dict:
    """Run one command under GNU time: wall time, and the peak resident memory of the command itself
    (a child forked straight from this Python process would report this process's size as its floor)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = done.stderr.splitlines()
    peak = next((int(line.split("=")[1]) for line in reversed(lines) if line.startswith("MAXRSS_KB=")), -1)
    row = {"command": " ".join(args[2:] if args[:2] == CLI[:2] else args), "seconds": round(seconds, 1),
           "peak_rss_gib": round(peak * 1024 / GIB, 3), "returncode": done.returncode,
           "output_tail": (done.stdout + done.stderr)[-1500:]}
    print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
    if done.returncode != 0:
        print(row["output_tail"], flush=True)
    return row


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_layers_file(source: Path, path: Path) -> int:
    """A CLEAR-layers file with random values for the official tensors (to_q/to_k/to_v/to_out.0 of every
    attention site), one tensor at a time."""
    shapes = {}
    for shard in weight_files(source):
        for name, entry in read_header(shard).tensors.items():
            if any(f".attn.{p}." in name for p in ("to_q", "to_k", "to_v", "to_out.0")):
                shapes[name] = entry.shape
    generator = torch.Generator().manual_seed(1)
    write_file(path, [(n, torch.bfloat16, s) for n, s in shapes.items()],
               lambda n: torch.randn(shapes[n], generator=generator).mul_(0.02).to(torch.bfloat16))
    return len(shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (needs about 50 GB free)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "real-size")
    parser.add_argument("--config", choices=["flux-dev", "tiny"], default="flux-dev",
                        help="tiny: the same steps on a toy model (a smoke run)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = FLUX_DEV if args.config == "flux-dev" else dict(FLUX_DEV, num_layers=2, num_single_layers=2,
                                                             attention_head_dim=32, num_attention_heads=4,
                                                             axes_dims_rope=(8, 12, 12))
    source = args.work / "flux-dev-random"
    results = {"machine": {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                       * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
               "rows": []}

    started = time.perf_counter()
    if not (source / "config.json").is_file():
        write_random_checkpoint(source, config, shards=5)
    results["source"] = {"folder": str(source), "gib": round(folder_bytes(source) / GIB, 2),
                         "shards": len(weight_files(source)),
                         "largest_shard_gib": round(max(p.stat().st_size for p in weight_files(source)) / GIB, 2),
                         "written_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(results["source"]), flush=True)
    layers_file = args.work / "clear_local_16.safetensors"
    if not layers_file.is_file():
        results["layers_file_tensors"] = write_layers_file(source, layers_file)
    results["layers_file_gib"] = round(layers_file.stat().st_size / GIB, 2)

    def step(name, command, output=None, check=None):
        row = run(command)
        row["name"] = name
        if check is not None and row["returncode"] == 0:
            row.update(check())
        results["rows"].append(row)
        if output is not None and output.exists():
            shutil.rmtree(output)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return row

    copy = args.work / "plain-copy"
    step("plain copy (cp -r)", ["cp", "-r", str(source), str(copy)], copy)
    zero = args.work / "zero-shot"

    def same_bytes():
        pairs = [(s, zero / s.name) for s in weight_files(source)]
        return {"same_inode": all(s.stat().st_ino == o.stat().st_ino for s, o in pairs),
                "output_dtypes": sorted({e.dtype for _, o in pairs for e in read_header(o).tensors.values()})}

    step("zero-shot convert (hard links)", CLI + ["convert", "--model", str(source), "--radius", "16", "--out",
                                                  str(zero)], None, same_bytes)
    step("push-to-hub --dry-run", CLI + ["push-to-hub", str(zero), "--repo-id", "me/flux-dev-clear16", "--dry-run"])
    probe = ("import sys, torch; from clear_surgery.hub import load_converted; "
             "m = load_converted(sys.argv[1]); p = dict(m.named_parameters()); "
             "print(p['transformer_blocks.0.attn.to_q.weight'].dtype, sum(t.numel() for t in p.values()))")
    step("load_converted", [sys.executable, "-c", probe, str(zero)])
    stock = ("import sys, torch, diffusers; m = diffusers.FluxTransformer2DModel.from_pretrained(sys.argv[1], "
             "torch_dtype=torch.bfloat16); print(sum(t.numel() for t in m.parameters()))")
    step("stock diffusers from_pretrained", [sys.executable, "-c", stock, str(zero)])
    shutil.rmtree(zero)

    copied = args.work / "zero-shot-copied"
    step("zero-shot convert --no-link (streamed copies)", CLI + ["convert", "--model", str(source), "--radius", "16",
                                                                 "--no-link", "--out", str(copied)], copied)
    layered = args.work / "clear-layers"

    def layers_applied():
        shard = next(p for p in weight_files(layered) if "transformer_blocks.0.attn.to_q.weight"
                     in read_header(p).tensors)
        got = read_tensor(read_header(shard), "transformer_blocks.0.attn.to_q.weight")
        want = read_tensor(read_header(layers_file), "transformer_blocks.0.attn.to_q.weight")
        return {"layers_applied": bool(torch.equal(got, want))}

    step("convert --clear-layers", CLI + ["convert", "--model", str(source), "--clear-layers", str(layers_file),
                                          "--out", str(layered)], layered, layers_applied)
    half = args.work / "fp16"
    step("convert --dtype fp16", CLI + ["convert", "--model", str(source), "--radius", "16", "--dtype", "fp16",
                                        "--out", str(half)], half)
    layers = args.work / "layers"
    step("convert --format layers", CLI + ["convert", "--model", str(source), "--radius", "16", "--format", "layers",
                                           "--out", str(layers)], layers)
    print(json.dumps({r["name"]: (r["seconds"], r["peak_rss_gib"], r["returncode"]) for r in results["rows"]},
                     indent=1))


if __name__ == "__main__":
    main()
