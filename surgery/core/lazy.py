"""Package attributes imported on first use.

``clear_surgery.surgery`` and ``clear_surgery.hub`` re-export names from modules that import torch and
diffusers (seconds of start-up); reading them lazily lets the command line check its arguments, and
fail on bad ones, before paying for that.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, table: dict[str, list[str]]):
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``table``'s module (relative name) the
    first time one of its names is read."""
    home = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
