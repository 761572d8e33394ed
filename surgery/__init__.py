"""Model surgery: analyze a diffusion transformer's attention and rewrite it into CLEAR.

The core (config, families, analysis, rewrite, tiling, state) is here; the tools built on it
(generate, profile, bench, coverage, distillation) are in ``clear_surgery.surgery.tools``. Names are
imported on first use (``clear_surgery.surgery.lazy``).
"""

from .lazy import lazy_exports

_EXPORTS = {
    "analysis": ["AnalysisReport", "AttentionSite", "analyze"],
    "builtin": ["BUILTIN_PREFIX", "build_tiny_model", "builtin_class", "builtin_names", "load_builtin",
                "tiny_pipeline"],
    "config": ["ClearConfig", "runtime_backend"],
    "families": ["FAMILIES", "ModelFamily", "example_inputs", "family_for_class", "family_of", "image_grid",
                 "is_controlnet", "tiny_models"],
    "patch_parallel": ["disable_patch_parallel", "enable_patch_parallel"],
    "processors": ["AttentionCall", "ClearRuntime", "ClearSDPAProcessor"],
    "rewrite": ["NoJointAttentionError", "RewriteError", "apply_clear", "dense_attention", "observe_attention",
                "remove_clear", "select_sites", "set_backend"],
    "state": ["ClearState", "clear_tensors", "get_clear_state", "is_clear_tensor"],
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
