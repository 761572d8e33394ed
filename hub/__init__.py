"""Checkpoint formats of clear-surgery (converted-model folders, CLEAR layers), model cards, Hub
upload, and the one model resolver every command uses. No rewrite logic here: loading a CLEAR
folder calls the core's public verb ``apply_clear``."""

from .atomic import atomic_directory, atomic_file, write_json
from .checkpoint import CLEAR_CONFIG_NAME, ClearFolderError, tensor_mismatches
from .clear_layers import (DEFAULT_TRAINED, ClearLayersError, apply_layer_tensors, load_clear_layers,
                           official_radius, save_clear_layers, trained_names)
from .converted import check_converted_folder, load_converted, read_clear_config, save_converted
from .download import HubError, resolve_file, resolve_folder
from .model_card import render_model_card
from .resolve import ModelLoadError, ModelRef, load_model, parse_dtype, resolve_model

__all__ = ["CLEAR_CONFIG_NAME", "ClearFolderError", "ClearLayersError", "DEFAULT_TRAINED", "HubError", "ModelLoadError",
           "ModelRef", "apply_layer_tensors", "atomic_directory", "atomic_file", "check_converted_folder",
           "load_clear_layers", "load_converted", "load_model", "official_radius", "parse_dtype",
           "read_clear_config", "render_model_card", "resolve_file", "resolve_folder", "resolve_model",
           "save_clear_layers", "save_converted", "tensor_mismatches", "trained_names", "write_json"]
