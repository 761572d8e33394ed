"""Checkpoint formats of clear-surgery: converted-model folders (and, later, CLEAR layers)."""

from .checkpoint import CLEAR_CONFIG_NAME, atomic_directory, tensor_mismatches
from .converted import ClearFolderError, load_converted, read_clear_config, save_converted

__all__ = ["CLEAR_CONFIG_NAME", "ClearFolderError", "atomic_directory", "load_converted", "read_clear_config",
           "save_converted", "tensor_mismatches"]
