"""Image comparison metrics for transfer checks: PSNR, SSIM, conditions recomputed from an image
(grayscale, edges), and the learned metrics (LPIPS, CLIP, DINO, FID) when their weights are on this
machine. Images are float tensors (N, 3, H, W) in [0, 1]."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

CONDITIONS = ("gray", "edges")


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Peak signal-to-noise ratio in dB per image (peak 1); inf for identical images."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else -10 * math.log10(m) for m in mse.tolist()]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Structural similarity per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, peak 1), averaged over channels and valid window positions; 1 for identical images."""
    a, b = a.double(), b.double()
    channels = a.shape[1]
    size = min(11, a.shape[-2], a.shape[-1])
    g = _gaussian_window(size)
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).tolist()


def condition_of(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The ControlNet condition recomputed from images: ``gray`` (BT.601 luminance) or ``edges``
    (Sobel gradient magnitude of the luminance, scaled to [0, 1]); (N, 1, H, W)."""
    if kind not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {kind!r}")
    y = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])[:, None]
    if kind == "gray":
        return y
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=y.dtype)
    gx = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kx.T[None, None])
    return (gx.pow(2) + gy.pow(2)).sqrt().div(4 * math.sqrt(2)).clamp(0, 1)


# --- learned metrics: only with weights already on this machine (nothing is downloaded) ---------

def _hf_cached(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model if its config is in the cache (or ``repo_id`` is a folder)."""
    if Path(repo_id).is_dir():
        return Path(repo_id)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _torch_hub_file(name: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


def _package_and_weights(modules: tuple[str, ...], packages: str, checkpoint: str, weights: str) -> str | None:
    """What a learned metric lacks: its packages, or its checkpoint in the torch hub cache; None if nothing."""
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return f"needs {packages}"
    if _torch_hub_file(checkpoint) is None:
        return f"needs {weights} in {torch.hub.get_dir()}/checkpoints"
    return None


class LearnedMetrics:
    """LPIPS (package ``lpips``, AlexNet weights in the torch hub cache), CLIP and DINO image-embedding
    cosine similarity (``CLIP_MODEL`` / ``DINO_MODEL``, Hub ids or folders, from the local cache), FID
    (``torchmetrics`` + ``torch-fidelity`` Inception weights in the torch hub cache). ``missing`` says
    for each one that cannot run what it lacks."""

    clip_model = os.environ.get("CLIP_MODEL", "openai/clip-vit-base-patch32")
    dino_model = os.environ.get("DINO_MODEL", "facebook/dinov2-small")

    def __init__(self):
        self.missing: dict[str, str] = {}
        self.available: list[str] = []
        self._check("lpips", self._lpips_ready)
        self._check("clip", lambda: self._hub_ready(self.clip_model))
        self._check("dino", lambda: self._hub_ready(self.dino_model))
        self._check("fid", self._fid_ready)

    def _check(self, name, ready):
        reason = ready()
        if reason:
            self.missing[name] = reason
        else:
            self.available.append(name)

    @staticmethod
    def _lpips_ready() -> str | None:
        return _package_and_weights(("lpips",), "the `lpips` package (pip install lpips) and its AlexNet weights",
                                    "alexnet-owt-7be5be79.pth", "torchvision's AlexNet weights")

    @staticmethod
    def _hub_ready(repo_id: str) -> str | None:
        if _hf_cached(repo_id) is None:
            return f"needs {repo_id} in the local Hugging Face cache (or set the folder in the environment)"
        return None

    @staticmethod
    def _fid_ready() -> str | None:
        return _package_and_weights(("torch_fidelity", "torchmetrics.image.fid"),
                                    "`torchmetrics` and `torch-fidelity` (pip install torchmetrics[image])",
                                    "weights-inception-2015-12-05-6726825d.pth", "the FID Inception weights")

    @torch.no_grad()
    def compute(self, original: torch.Tensor, clear: torch.Tensor) -> dict[str, list[float] | float]:
        out: dict = {}
        if "lpips" in self.available:
            import lpips

            net = lpips.LPIPS(net="alex", verbose=False)
            out["lpips"] = net(original * 2 - 1, clear * 2 - 1).flatten().tolist()
        for name, repo in (("clip", self.clip_model), ("dino", self.dino_model)):
            if name in self.available:
                out[f"{name}_similarity"] = _embedding_similarity(_hf_cached(repo), original, clear, name)
        if "fid" in self.available:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(normalize=True)
            fid.update(original, real=True)
            fid.update(clear, real=False)
            out["fid"] = float(fid.compute())
        return out


def _embedding_similarity(folder: Path, a: torch.Tensor, b: torch.Tensor, kind: str) -> list[float]:
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    processor = AutoImageProcessor.from_pretrained(folder)
    model = (CLIPVisionModelWithProjection if kind == "clip" else AutoModel).from_pretrained(folder).eval()

    def embed(x):
        inputs = processor(images=list(x), return_tensors="pt", do_rescale=False)
        out = model(**inputs)
        return out.image_embeds if kind == "clip" else out.pooler_output

    return F.cosine_similarity(embed(a), embed(b)).tolist()
