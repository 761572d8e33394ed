import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: Hub lookups fail at once
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def model_call(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out[0], torch.Tensor) else torch.cat([t.flatten() for t in out[0]])
