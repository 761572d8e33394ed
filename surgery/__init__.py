"""Model surgery: analyze a diffusion transformer's attention and rewrite it into CLEAR."""

from .analysis import AnalysisReport, AttentionSite, analyze
from .builtin import builtin_names, load_builtin, tiny_pipeline
from .config import ClearConfig
from .families import example_inputs, image_grid
from .loading import ModelLoadError, load_model
from .processors import ClearFluxAttnProcessor, ClearJointAttnProcessor, ClearRuntime
from .rewrite import NoJointAttentionError, RewriteError, apply_clear, remove_clear, select_sites

__all__ = [
    "AnalysisReport", "AttentionSite", "ClearConfig", "ClearFluxAttnProcessor", "ClearJointAttnProcessor",
    "ClearRuntime", "ModelLoadError", "NoJointAttentionError", "RewriteError", "analyze", "apply_clear",
    "builtin_names", "example_inputs", "image_grid", "load_builtin", "load_model", "remove_clear",
    "select_sites", "tiny_pipeline",
]
