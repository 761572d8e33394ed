"""CLEAR on a CPU, dense against CLEAR r = 4 with the backend ``auto`` picks there, each measurement in a
process of its own (wall time; peak RSS from that process's own rusage):

- step: the built-in tiny FLUX transformer at each image size (the pipeline's token grid: its VAE halves the
  side, FLUX packs 2 x 2, so 1024 px is 256 x 256 = 65,536 image tokens): how far its first forward raises
  the process's peak memory, and the time of a second forward;
- generate: the whole ``clear-surgery generate`` command (1 step) as a user runs it, text encoders and VAE
  included, CLEAR from a converted folder (``convert --radius 4``, made once beforehand).

    python recipes/benchmarks/cpu_generate.py --out OUT [--sizes 256,512,1024]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = """
import sys, time, torch
from clear_surgery.surgery import ClearConfig, apply_clear, load_builtin
from clear_surgery.surgery.core.builtin import tiny_pipeline
size, mode = int(sys.argv[1]), sys.argv[2]
pipe = tiny_pipeline("builtin:tiny-flux")
model = pipe.transformer.eval()
if mode == "clear":
    apply_clear(model, ClearConfig(radius=4))
side = size // pipe.vae_scale_factor // 2
torch.manual_seed(0)
ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
inputs = dict(hidden_states=torch.randn(1, side * side, model.config.in_channels),
              encoder_hidden_states=torch.randn(1, 16, model.config.joint_attention_dim),
              pooled_projections=torch.randn(1, model.config.pooled_projection_dim), timestep=torch.tensor([0.5]),
              img_ids=ids.reshape(-1, 3).float(), txt_ids=torch.zeros(16, 3), guidance=torch.tensor([3.5]))
import resource
with torch.no_grad():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(**inputs)  # the first forward: how far it raises the process's peak memory
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    start = time.perf_counter()
    model(**inputs)  # the second: its time
print(time.perf_counter() - start, side * side, grown / 2**20)
"""


def run(cmd: list[str]) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)  # this process's own rusage: its peak resident memory
    seconds = time.perf_counter() - start
    stdout, stderr = child.stdout.read(), child.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "returncode": code,
            "stdout": stdout.strip(), "error": stderr.strip().splitlines()[-1] if code else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="256,512,1024")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "clear_surgery.surgery.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-flux-clear4"
        subprocess.run([*cli, "convert", "--model", "builtin:tiny-flux", "--radius", "4", "--out", str(folder)],
                       check=True, capture_output=True)
        for size in map(int, args.sizes.split(",")):
            for mode in ("dense", "clear"):
                step = run([sys.executable, "-c", STEP, str(size), mode])
                seconds, tokens, grown = step.pop("stdout").split() if step["returncode"] == 0 else (None,) * 3
                rows.append({"what": "step", "size": size, "mode": mode, "image_tokens": tokens and int(tokens),
                             "forward_s": seconds and round(float(seconds), 2),
                             "forward_peak_growth_gib": grown and round(float(grown), 3), **step})
                print(json.dumps(rows[-1]), flush=True)
                model = str(folder) if mode == "clear" else "builtin:tiny-flux"
                gen = run([*cli, "generate", "--model", model, "--prompt", "a cat", "--height", str(size), "--width",
                           str(size), "--steps", "1", "--out", str(Path(tmp) / f"{size}-{mode}.png")])
                gen.pop("stdout")
                rows.append({"what": "generate", "size": size, "mode": mode, **gen})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "cpu_generate.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
