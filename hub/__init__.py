"""Checkpoint formats of clear-surgery (converted-model folders, CLEAR layers), model cards, Hub
upload, and the one model resolver every command uses. No rewrite logic here: loading a CLEAR
folder calls the core's public verb ``apply_clear``. Names are imported on first use."""

from clear_surgery.surgery.core.lazy import lazy_exports

_EXPORTS = {
    "atomic": ["atomic_directory", "atomic_file", "write_json"],
    "checkpoint": ["CLEAR_CONFIG_NAME", "ClearFolderError", "tensor_mismatches"],
    "clear_layers": ["DEFAULT_TRAINED", "ClearLayersError", "apply_layer_tensors", "load_clear_layers",
                     "official_radius", "save_clear_layers", "trained_names"],
    "converted": ["check_converted_folder", "load_converted", "read_clear_config", "save_converted"],
    "download": ["HubError", "resolve_file", "resolve_folder"],
    "model_card": ["render_model_card"],
    "resolve": ["ModelLoadError", "ModelRef", "load_model", "parse_dtype", "resolve_model"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
