"""CLEAR attention op and its backends: ``torch.ops.clear.attention``."""

from .backends import BACKENDS, Backend, backend_names, choose_backend, register_backend
from .flex import clear_block_mask, flex_clear_attention
from .layout import TokenLayout, classify_blocks, dense_mask, validate_call
from .merge import merge_partials
from .op import attention, clear_attention
from .pooling import pool_image_tokens, spatial_weight_shape
from .reference import reference_attention

__all__ = [
    "BACKENDS", "Backend", "TokenLayout", "attention", "backend_names", "choose_backend",
    "classify_blocks", "clear_attention", "clear_block_mask", "dense_mask", "flex_clear_attention", "merge_partials",
    "pool_image_tokens", "reference_attention", "register_backend", "spatial_weight_shape", "validate_call",
]
