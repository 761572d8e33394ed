"""Model surgery: analyze a diffusion transformer's attention and rewrite it into CLEAR.

Three layers, one subpackage each: the core (``core``: config, families, analysis, rewrite, run-time
route, tile layout, patch parallelism, state), the tools built on it and on the checkpoint formats
(``tools``: convert, generate, profile, bench, coverage, distillation, transfer checks, launching) and the
command line on top (``cli``). This module re-exports the core's public names, imported on first use
(``core/lazy.py``).
"""

from .core.lazy import lazy_exports

_EXPORTS = {
    "core.analysis": ["AnalysisReport", "AttentionSite", "analyze"],
    "core.builtin": ["BUILTIN_PREFIX", "build_tiny_model", "builtin_class", "builtin_names", "load_builtin",
                     "tiny_pipeline"],
    "core.config": ["ClearConfig", "runtime_backend"],
    "core.families": ["FAMILIES", "ModelFamily", "example_inputs", "family_for_class", "family_of", "image_grid",
                      "is_controlnet", "tiny_models"],
    "core.patch_parallel": ["disable_patch_parallel", "enable_patch_parallel"],
    "core.processors": ["AttentionCall", "ClearRuntime", "ClearSDPAProcessor"],
    "core.rewrite": ["NoJointAttentionError", "RewriteError", "apply_clear", "dense_attention", "observe_attention",
                     "remove_clear", "select_sites", "set_backend"],
    "core.state": ["ClearState", "clear_tensors", "get_clear_state", "is_clear_tensor"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
