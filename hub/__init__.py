"""Checkpoint formats of clear-surgery: converted-model folders and CLEAR layers, model cards, Hub upload."""

from .checkpoint import CLEAR_CONFIG_NAME, atomic_directory, tensor_mismatches
from .clear_layers import (ClearLayersError, apply_layer_tensors, load_clear_layers, official_radius, save_clear_layers,
                           trained_names)
from .converted import ClearFolderError, load_converted, read_clear_config, resolve_folder, save_converted
from .model_card import render_model_card

__all__ = ["CLEAR_CONFIG_NAME", "ClearFolderError", "ClearLayersError", "apply_layer_tensors", "atomic_directory",
           "load_clear_layers", "load_converted", "official_radius", "read_clear_config", "render_model_card",
           "resolve_folder", "save_clear_layers", "save_converted", "tensor_mismatches", "trained_names"]
