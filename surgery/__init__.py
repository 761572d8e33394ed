"""Model surgery: analyze a diffusion transformer's attention and rewrite it into CLEAR.

The core (config, families, analysis, rewrite, tiling, state) is here; the tools built on it
(generate, profile, bench, coverage, distillation) are in ``clear_surgery.surgery.tools``.
"""

from .analysis import AnalysisReport, AttentionSite, analyze
from .builtin import BUILTIN_PREFIX, builtin_class, builtin_names, load_builtin, tiny_pipeline
from .config import ClearConfig
from .families import FAMILIES, ModelFamily, example_inputs, family_for_class, family_of, image_grid
from .processors import ClearRuntime, ClearSDPAProcessor
from .rewrite import (NoJointAttentionError, RewriteError, apply_clear, dense_attention, remove_clear,
                      select_sites)
from .state import ClearState, get_clear_state

__all__ = [
    "AnalysisReport", "AttentionSite", "BUILTIN_PREFIX", "ClearConfig", "ClearRuntime", "ClearSDPAProcessor",
    "ClearState", "FAMILIES", "ModelFamily", "NoJointAttentionError", "RewriteError", "analyze", "apply_clear",
    "builtin_class", "builtin_names", "dense_attention", "example_inputs", "family_for_class", "family_of",
    "get_clear_state",
    "image_grid", "load_builtin", "remove_clear", "select_sites", "tiny_pipeline",
]
