"""Does this machine load AOTInductor packages at all? A one-layer nn.Linear compiled three ways (CUDA
model .so through torch._export.aot_load, CUDA package single-threaded, CPU package), each loaded in a
fresh process; prints each return code (-11: segmentation fault).

    python recipes/benchmarks/aoti_load_check.py
"""
import subprocess, sys
base = """
import faulthandler, tempfile, torch; faulthandler.enable()
from pathlib import Path
tmp = Path(tempfile.mkdtemp())
m = torch.nn.Linear(16, 16).cuda(); x = torch.randn(4, 16, device='cuda')
ep = torch.export.export(m, (x,))
"""
tries = {
 "aot_load_so": "so = torch._inductor.aot_compile(ep.module(), (x,)); print('so', so, flush=True); r = torch._export.aot_load(so, 'cuda'); print('ok', r(x).shape)",
 "single_threaded": "from torch._inductor import aoti_compile_and_package, aoti_load_package; p = aoti_compile_and_package(ep, package_path=str(tmp/'m.pt2')); r = aoti_load_package(p, run_single_threaded=True); print('ok', r(x).shape)",
 "cpu_package": "from torch._inductor import aoti_compile_and_package, aoti_load_package; mc = torch.nn.Linear(16,16); e2 = torch.export.export(mc, (torch.randn(4,16),)); p = aoti_compile_and_package(e2, package_path=str(tmp/'c.pt2')); r = aoti_load_package(p); print('ok cpu', r(torch.randn(4,16)).shape)",
}
for name, body in tries.items():
    d = subprocess.run([sys.executable, "-c", base + body], capture_output=True, text=True, timeout=200)
    print(name, d.returncode, d.stdout[-300:].strip(), [l for l in d.stderr.splitlines() if "rror" in l][-3:])
