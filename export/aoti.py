"""AOTInductor: the converted model compiled ahead of time into one ``.pt2`` package that
``torch._inductor.aoti_load_package`` runs in any process, without this project installed.

Every CLEAR attention call becomes ``clear::attention_aot`` (the self-contained Triton kernel as a
``triton_op``), so the kernel itself is compiled into the package; the model is exported with the image
grid dynamic within the size profile. Compiling a CUDA package needs a CUDA GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from clear_surgery.plugins.op import self_contained_attention

PACKAGE_FILE = "model.pt2"
# compilers tried, in order, when Inductor's own does not build against the libstdc++ this process runs
OTHER_COMPILERS = ("g++", "c++", "/usr/bin/g++", "/usr/bin/c++")


def loaded_libstdcxx() -> Path | None:
    """The libstdc++ this process has loaded (torch links it), resolved; None where it cannot be read."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "libstdc++.so" in line]
    except OSError:
        return None
    return Path(paths[0]).resolve() if paths else None


def compiler_libstdcxx(cxx: str) -> Path | None:
    """The libstdc++ that ``cxx`` links programs against, resolved; None where it does not say."""
    try:
        done = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(done.stdout.strip())
    return path.resolve() if done.returncode == 0 and path.is_absolute() and path.exists() else None


def choose_compiler(default: str) -> str:
    """The C++ compiler for a package that must load in this process's libstdc++.

    A package built with a newer compiler than the libstdc++ torch runs on compiles the newer headers'
    templates (std::regex, on the model's first construction) against the older library's locale
    facets, and crashes on load: seen on a GPU image whose Inductor default was a separate GCC while
    torch ran on the system's libstdc++ (a segfault in the package's parse_device_str; recipes/benchmarks
    has the backtrace). ``default`` (Inductor's choice) is kept where it matches, or where CXX was set
    explicitly; otherwise the first compiler of OTHER_COMPILERS that matches; a warning where none does."""
    loaded = loaded_libstdcxx()
    if loaded is None or compiler_libstdcxx(default) == loaded:
        return default
    if not os.environ.get("CXX"):
        for other in OTHER_COMPILERS:
            found = shutil.which(other)
            if found and compiler_libstdcxx(found) == loaded:
                return found
    warnings.warn(f"the C++ compiler {default} builds against {compiler_libstdcxx(default)}, but this process runs "
                  f"{loaded}: the AOTInductor package may crash on load (set CXX to a compiler that matches)",
                  stacklevel=2)
    return default


def export_aoti(prepared, out: Path) -> dict:
    """Write ``out/model.pt2`` for a prepared model (on a CUDA device); returns the manifest's fields."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler

    with torch.no_grad(), self_contained_attention():
        program = torch.export.export(prepared.wrapper, (), prepared.inputs, dynamic_shapes=prepared.dynamic_shapes,
                                      strict=False)
    cxx = choose_compiler(str(get_cpp_compiler()))
    with inductor_config.patch({"cpp.cxx": (None, cxx)}):
        aoti_compile_and_package(program, package_path=str(out / PACKAGE_FILE))
    return {"package": PACKAGE_FILE, "torch_version": torch.__version__, "input_order": list(prepared.inputs),
            "cxx": cxx, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def load_package(path: str | Path):
    """The compiled model of a package: call it with the manifest's inputs, by name."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))
