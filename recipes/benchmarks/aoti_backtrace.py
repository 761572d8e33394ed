"""Why AOTInductor packages crash on load on the lent GPU image, and what loads: a one-layer nn.Linear CUDA
package compiled with Inductor's default C++ compiler and with the system /usr/bin/g++, each loaded in a fresh
process; the crashing load run under cuda-gdb (the image has no gdb) for a native backtrace.

    python recipes/benchmarks/aoti_backtrace.py --out OUT     # writes OUT/aoti_backtrace.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMPILE = """
import sys, torch
from torch._inductor import aoti_compile_and_package, config
if sys.argv[2] != "default":
    config.cpp.cxx = (None, sys.argv[2])
from torch._inductor.cpp_builder import get_cpp_compiler
print("compiler", get_cpp_compiler(), flush=True)
torch.manual_seed(0)
m = torch.nn.Linear(16, 16).cuda(); x = torch.randn(4, 16, device="cuda")
aoti_compile_and_package(torch.export.export(m, (x,)), package_path=sys.argv[1])
torch.save({"w": m.state_dict(), "x": x.cpu(), "y": m(x).detach().cpu()}, sys.argv[1] + ".ref")
"""
LOAD = """
import faulthandler, sys, torch; faulthandler.enable()
from torch._inductor import aoti_load_package
ref = torch.load(sys.argv[1] + ".ref", weights_only=True)
runner = aoti_load_package(sys.argv[1])
y = runner(ref["x"].cuda())
y = y[0] if isinstance(y, (list, tuple)) else y
print("loaded; max abs diff", float((y.cpu() - ref["y"]).abs().max()), flush=True)
"""


def run(cmd, timeout=600, env=None, keep=4000):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return {"returncode": done.returncode, "stdout": done.stdout[-keep:], "stderr": done.stderr[-keep:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compilers", default="default,system", help="which of default,system to try")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"versions": {c: run([c, "--version"])["stdout"].splitlines()[:1] for c in ("/usr/bin/g++", "g++")
                           if shutil.which(c)}}
    for name, compiler in (("default", "default"), ("system", "/usr/bin/g++")):
        if name not in args.compilers.split(","):
            continue
        package = str(args.out / f"linear-{name}.pt2")
        report[f"compile_{name}"] = run([sys.executable, "-c", COMPILE, package, compiler])
        report[f"load_{name}"] = run([sys.executable, "-c", LOAD, package])
        if report[f"load_{name}"]["returncode"] != 0 and shutil.which("cuda-gdb"):
            report[f"backtrace_{name}"] = run(["cuda-gdb", "-batch", "-ex", "set pagination off", "-ex", "run",
                                               "-ex", "bt 30", "-ex", "info symbol $pc", "--args", sys.executable,
                                               "-c", LOAD, package], env=dict(os.environ, PYTHONFAULTHANDLER="0"),
                                              keep=12000)
        for suffix in ("", ".ref"):
            Path(package + suffix).unlink(missing_ok=True)
    (args.out / "aoti_backtrace.json").write_text(json.dumps(report, indent=1) + "\n")
    for key, value in report.items():
        print(key, json.dumps(value)[:3000])


if __name__ == "__main__":
    main()
