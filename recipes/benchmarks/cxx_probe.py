"""Which C++ compiler can build an AOTInductor package that loads in this process: for Inductor's default
compiler (from CXX where set) and the usual others, its version, where it finds libstdc++.so to link against
(the bare name: nowhere), its C++ headers' GCC release, whether a shared library it builds loads libstdc++
dynamically, and what ``export`` holds against it; then the compiler ``export`` would choose.

    python recipes/benchmarks/cxx_probe.py
"""
import os
import shutil
import subprocess

from torch._inductor.cpp_builder import get_cpp_compiler

from clear_surgery.export.aoti import (choose_compiler, compiler_problem, headers_release, library_release,
                                       links_libstdcxx_dynamically, loaded_libstdcxx)


def answer(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""


loaded = loaded_libstdcxx()
release = library_release(loaded) if loaded else None
print(f"CXX={os.environ.get('CXX')!r}; this process runs {loaded} (GCC {release})")
default = str(get_cpp_compiler())
for name in dict.fromkeys((default, "g++", "c++", "/usr/bin/g++")):
    path = shutil.which(name)
    if path is None:
        print(f"{name}: not found")
        continue
    print(f"{name} -> {path}: {answer(path, '--version')}; libstdc++.so: {answer(path, '-print-file-name=libstdc++.so')}; "
          f"headers GCC {headers_release(path)}; links libstdc++ dynamically: {links_libstdcxx_dynamically(path)}; "
          f"problem: {compiler_problem(path, release)}")
print("export chooses", choose_compiler(default))
