"""AOTInductor: the converted model compiled ahead of time into one ``.pt2`` package that
``torch._inductor.aoti_load_package`` runs; the model is exported with the image grid dynamic within the size
profile. Where its CLEAR attention runs:

- "embedded": every call becomes ``clear::attention_aot`` (the self-contained Triton kernel as a ``triton_op``),
  so the kernel itself is compiled into the package, which runs in any process with torch, without this project.
  Compiling it needs a CUDA GPU.
- "registered": every call stays ``clear::attention``, which the package calls through torch's dispatcher: the
  loading process must have the op (``import clear_surgery.plugins``; ``load_package`` does) and runs the backend
  the model was converted with at run time ("auto": the fastest there, e.g. the Gluon kernel on Hopper, which
  Inductor cannot compile into a package). CPU packages too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
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


# libstdc++.so.6.0.N -> the GCC release that introduced it (libstdc++'s ABI history); later files are newer still
LIBRARY_RELEASES = {26: 9, 27: 9, 28: 10, 29: 11, 30: 12, 31: 13, 32: 13, 33: 14, 34: 15}


def library_release(library: Path) -> int | None:
    """The GCC release of a libstdc++ file (its name's last number); None where the name does not say."""
    name = library.name
    if not name.startswith("libstdc++.so.6.0.") or not name.rsplit(".", 1)[-1].isdigit():
        return None
    patch = int(name.rsplit(".", 1)[-1])
    newest = max(LIBRARY_RELEASES)
    return LIBRARY_RELEASES.get(patch) or (LIBRARY_RELEASES[newest] + patch - newest if patch > newest else None)


def headers_release(cxx: str) -> int | None:
    """The GCC release of the C++ headers ``cxx`` compiles with (``_GLIBCXX_RELEASE``); None where it cannot
    say (not a GCC/libstdc++ toolchain, or not runnable)."""
    try:
        done = subprocess.run([cxx, "-x", "c++", "-E", "-dM", "-include", "cstddef", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["#define", "_GLIBCXX_RELEASE"] and len(parts) == 3 and parts[2].isdigit():
            return int(parts[2])
    return None


def links_libstdcxx_dynamically(cxx: str) -> bool | None:
    """Whether a shared library ``cxx`` builds (as Inductor builds a package's) loads libstdc++ as a shared
    library (True) or carries its own copy (False); None where the probe does not build."""
    with tempfile.TemporaryDirectory() as tmp:
        source, library = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        source.write_text('#include <string>\nstd::string probe(const char* s) { return std::string(s) + "!"; }\n')
        try:
            done = subprocess.run([cxx, "-shared", "-fPIC", str(source), "-o", str(library)], capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0 or not library.exists():
            return None
        # a dynamic link names the library in the dynamic section's string table; a static copy does not
        return b"libstdc++.so.6\x00" in library.read_bytes()


def compiler_problem(cxx: str, library: int | None) -> str | None:
    """Why a package compiled with ``cxx`` would not load in this process (None: nothing known against it)."""
    release = headers_release(cxx)
    if release is not None and library is not None and release > library:
        return f"has GCC {release}'s C++ headers, newer than the libstdc++ this process runs (GCC {library})"
    if links_libstdcxx_dynamically(cxx) is False:
        return "links its own copy of libstdc++ into shared libraries"
    return None


def choose_compiler(default: str) -> str:
    """The C++ compiler for a package that must load in this process, beside the libstdc++ torch runs on.

    Two ways a package crashes on load (std::regex, on the model's first construction, in its
    parse_device_str): it carries its own copy of libstdc++, or it was compiled with newer C++ headers than
    the library it runs with. The first is the lent GPU image's: its CXX, a separate GCC that finds no
    libstdc++.so to link against, links the static library into the package, whose locale facets then crash
    beside the process's (recipes/benchmarks has the frames and the probe). ``default`` (Inductor's choice,
    from CXX where set) is kept where nothing is known against it; otherwise the first compiler of
    OTHER_COMPILERS without either problem, with a warning where CXX named the replaced one (a package that
    cannot load is of no use); a warning and ``default`` where none fits."""
    loaded = loaded_libstdcxx()
    library = library_release(loaded) if loaded else None
    problem = compiler_problem(default, library)
    if problem is None:
        return default
    rejected = shutil.which(default)
    for other in OTHER_COMPILERS:
        found = shutil.which(other)
        if found and found != rejected and compiler_problem(found, library) is None:  # (each probe builds a library)
            if os.environ.get("CXX"):
                warnings.warn(f"CXX={os.environ['CXX']} {problem}: the package would crash on load; compiling it "
                              f"with {found} instead", stacklevel=2)
            return found
    warnings.warn(f"the C++ compiler {default} {problem}: the AOTInductor package may crash on load (set CXX to "
                  "a compiler without this problem)", stacklevel=2)
    return default


def exported_program(prepared, attention: str = "embedded") -> torch.export.ExportedProgram:
    """The prepared model as torch.export sees it, the image grid dynamic, every CLEAR call the self-contained
    kernel ("embedded") or the ``clear::attention`` op ("registered"): what Inductor compiles (``.module()`` runs
    it uncompiled, to tell the graph's errors from the compiler's)."""
    route = self_contained_attention() if attention == "embedded" else contextlib.nullcontext()
    with torch.no_grad(), route:
        return torch.export.export(prepared.wrapper, (), prepared.inputs, dynamic_shapes=prepared.dynamic_shapes,
                                   strict=False)


def inductor_options(cxx: str) -> dict:
    """Inductor's settings for a package. The weights go beside the compiled model in the package (one blob the
    runtime reads), not inside the .so: a FLUX.1-dev-sized model is 22 GiB, and past 2 GB Inductor would append
    them to the library for mmap.

    Like ``torch.compile``, a package fuses a model's casts away: FLUX computes ``guidance.to(bf16) * 1000``,
    which the eager bf16 model rounds (3.5 → 3504) and the package does not (3500, as the float32 model), so at
    guidance 3.5 its output is nearer the float32 model's than the bf16 eager model's is. Inductor's
    ``emulate_precision_casts`` would round as eager does, but AOTInductor of torch 2.11 fails to compile the
    kernel's ``triton_op`` with it (an assertion in its pattern matcher)."""
    return {"cpp.cxx": (None, cxx), "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob"}


def export_aoti(prepared, out: Path, program: torch.export.ExportedProgram | None = None,
                attention: str = "embedded") -> dict:
    """Write ``out/model.pt2`` for a prepared model (on a CUDA device; "registered" attention: or the CPU), from
    ``program`` where it was exported already (with the same ``attention``); returns the manifest's fields."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler

    program = program or exported_program(prepared, attention)
    cxx = choose_compiler(str(get_cpp_compiler()))
    with inductor_config.patch(inductor_options(cxx)):
        aoti_compile_and_package(program, package_path=str(out / PACKAGE_FILE))
    on_gpu = next(prepared.model.parameters()).is_cuda
    fields = {"package": PACKAGE_FILE, "torch_version": torch.__version__, "input_order": list(prepared.inputs),
              "cxx": cxx, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "attention": attention}
    if attention == "registered":
        fields["load"] = ("import clear_surgery.plugins before torch._inductor.aoti_load_package (the package calls "
                          "clear::attention)")
    return fields


def load_package(path: str | Path):
    """The compiled model of a package: call it with the manifest's inputs, by name. (This module's import has
    registered ``clear::attention``, which packages with "registered" attention call.)"""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))
