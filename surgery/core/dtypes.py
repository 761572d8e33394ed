"""One dtype vocabulary for every command, recipe and API that takes a dtype by name: bf16 | fp16 | fp32, the
long torch names (bfloat16, float16, float32) accepted too."""

from __future__ import annotations

import torch

from .errors import InvalidValueError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LONG_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def parse_dtype(name: str | None, option: str = "dtype") -> torch.dtype | None:
    """The torch dtype a name means (None: None, i.e. as stored); one error naming the choices otherwise."""
    if name is None:
        return None
    short = LONG_NAMES.get(name, name)
    if short not in DTYPES:
        raise InvalidValueError(f"{option}: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[short]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype ('bf16'), or torch's for any other ('float64')."""
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype).removeprefix("torch."))
