"""AOTInductor: the converted model compiled ahead of time into one ``.pt2`` package that
``torch._inductor.aoti_load_package`` runs in any process, without this project installed.

Every CLEAR attention call becomes ``clear::attention_aot`` (the self-contained Triton kernel as a
``triton_op``), so the kernel itself is compiled into the package; the model is exported with the image
grid dynamic within the size profile. Compiling a CUDA package needs a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clear_surgery.plugins.op import self_contained_attention

PACKAGE_FILE = "model.pt2"


def export_aoti(prepared, out: Path) -> dict:
    """Write ``out/model.pt2`` for a prepared model (on a CUDA device); returns the manifest's fields."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor.cpp_builder import get_cpp_compiler

    with torch.no_grad(), self_contained_attention():
        program = torch.export.export(prepared.wrapper, (), prepared.inputs, dynamic_shapes=prepared.dynamic_shapes,
                                      strict=False)
    aoti_compile_and_package(program, package_path=str(out / PACKAGE_FILE))
    # the C++ compiler Inductor used (CXX, or torch._inductor.config.cpp.cxx): a package must load with the
    # libstdc++ of the process that runs it, which one made by a newer compiler than the system's may not
    return {"package": PACKAGE_FILE, "torch_version": torch.__version__, "input_order": list(prepared.inputs),
            "cxx": str(get_cpp_compiler()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def load_package(path: str | Path):
    """The compiled model of a package: call it with the manifest's inputs, by name."""
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path))
