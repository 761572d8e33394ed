import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: Hub lookups fail at once
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def perturbed(model, scale: float = 0.05, seed: int = 0):
    """``model`` with every parameter moved by seeded noise: no zero-initialized layer (a ControlNet's
    output blocks) leaves an output that does not depend on the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen).to(param.dtype))
    return model.eval()


def coverage_model(family: str):
    """The coverage table's tiny model of ``family`` (perturbed) and its example call."""
    from clear_surgery.surgery import build_tiny_model

    model, inputs, *_ = build_tiny_model(family)
    return perturbed(model), inputs


def model_call(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out[0], torch.Tensor) else torch.cat([t.flatten() for t in out[0]])


# A model loaded from safetensors computes on its files' memory: CPU GEMM kernels may round the last
# bit differently for other alignments, so loaded-vs-in-memory outputs are compared this closely
# (the tensors themselves are compared bit for bit).
LOADED_TOLERANCE = 1e-6


def check_under_interpreter(cases: list, backend: str = "triton") -> None:
    """Run a triton backend on ``cases`` under TRITON_INTERPRET=1 (a subprocess: set before triton is
    imported) against the float64 reference; each case within fp32 or half-precision tolerance."""
    import json
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("triton_interpret_check.py")
    done = subprocess.run([sys.executable, str(script), json.dumps(cases), backend], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases)
    for case, res in zip(cases, results):
        tol = 1e-5 if case[9] == "float32" else 2e-2
        assert res["rel_err"] is not None and res["rel_err"] < tol, (case, res)
        if backend == "triton":  # log-sum-exp per query row, absolute (it is a log)
            assert res["lse_err"] is not None and res["lse_err"] < (1e-4 if case[9] == "float32" else 2e-2), (case, res)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a folder, by name: equal digests, equal folders."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def run_in_process(args, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """A ``clear-surgery`` command in this process, from ``cwd`` (the console script's start-up, mostly
    diffusers' imports, paid once per suite): its exit code and stderr."""
    from clear_surgery.surgery.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def cli_exe() -> str:
    """The installed ``clear-surgery`` entry point (for tests that run it as a user would)."""
    return shutil.which("clear-surgery") or str(Path(sys.executable).parent / "clear-surgery")


def cache_repo(hub_cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache (HF_HOME/hub) holds a downloaded repo."""
    sha = "c" * 40
    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
