"""The testbed's training photographs: the real photos shipped inside scikit-image and scikit-learn,
each with a caption naming it, and random crops of them.

    python recipes/testbed/photos.py --out photos.safetensors   # pack them (for a machine without scikit-image)
    python recipes/testbed/photos.py --conditions 256 --out recipes/testbed/conditions-256   # ControlNet conditions
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

SHORT_SIDE = 128  # photos are stored with this short side; crops take 50-100% of it

# (scikit-image / scikit-learn name, caption). Grayscale photos say so: the colorization ControlNet
# then learns that a gray condition may stay gray.
PHOTOS = (
    ("astronaut", "a photo of an astronaut"),
    ("coffee", "a photo of a cup of coffee"),
    ("chelsea", "a photo of a cat"),
    ("rocket", "a photo of a rocket launch"),
    ("hubble_deep_field", "a photo of galaxies in deep space"),
    ("immunohistochemistry", "a microscope photo of stained tissue"),
    ("retina", "a photo of a retina"),
    ("motorcycle", "a photo of a motorcycle"),
    ("camera", "a black and white photo of a cameraman"),
    ("coins", "a black and white photo of coins"),
    ("moon", "a black and white photo of the moon"),
    ("brick", "a black and white photo of a brick wall"),
    ("grass", "a black and white photo of grass"),
    ("gravel", "a black and white photo of gravel"),
    ("china.jpg", "a photo of a temple in china"),
    ("flower.jpg", "a photo of a flower"),
)
CAPTIONS = [caption for _, caption in PHOTOS]


def _read(name: str) -> np.ndarray:
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return image


def load_photos(short_side: int = SHORT_SIDE) -> list[torch.Tensor]:
    """The photos as uint8 (3, H, W) tensors, short side ``short_side`` (grayscale repeated to RGB)."""
    import torch.nn.functional as F

    out = []
    for name, _ in PHOTOS:
        image = _read(name)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float()
        scale = short_side / min(image.shape[1:])
        size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
        image = F.interpolate(image[None], size=size, mode="area")[0]
        out.append(image.round().clamp(0, 255).to(torch.uint8))
    return out


def save_photos(path, short_side: int = SHORT_SIDE) -> None:
    from safetensors.torch import save_file

    save_file({f"photo_{i:02d}": p.contiguous() for i, p in enumerate(load_photos(short_side))}, str(path))


def read_photos(path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [tensors[f"photo_{i:02d}"] for i in range(len(PHOTOS))]


class PhotoCrops:
    """Random crops (50-100% of the short side, resized to ``size``), random horizontal flips;
    pixels in [-1, 1]. ``batch(n)`` returns (images (n, 3, size, size), photo indices (n,))."""

    def __init__(self, photos: list[torch.Tensor], size: int, seed: int = 0, device="cpu"):
        self.photos = [p.to(device).float() / 127.5 - 1 for p in photos]
        self.size, self.device = size, device
        self.generator = torch.Generator().manual_seed(seed)

    def _rand(self, n=1):
        return torch.rand(n, generator=self.generator)

    def crop(self, index: int) -> torch.Tensor:
        import torch.nn.functional as F

        photo = self.photos[index]
        _, h, w = photo.shape
        side = int(min(h, w) * (0.5 + 0.5 * self._rand().item()))
        top = int((h - side) * self._rand().item())
        left = int((w - side) * self._rand().item())
        crop = photo[:, top:top + side, left:left + side]
        crop = F.interpolate(crop[None], size=(self.size, self.size), mode="area")[0]
        return crop.flip(-1) if self._rand().item() < 0.5 else crop

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.randint(len(self.photos), (n,), generator=self.generator)
        return torch.stack([self.crop(int(i)) for i in indices]), indices.to(self.device)


class CropPool:
    """``count`` crops made once (cutting them one by one costs more than a small model's step);
    ``batch(n)`` draws from them with fresh horizontal flips."""

    def __init__(self, crops: PhotoCrops, count: int):
        parts = [crops.batch(min(256, count - start)) for start in range(0, count, 256)]
        self.images = torch.cat([p[0] for p in parts])
        self.labels = torch.cat([p[1] for p in parts])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(self.images), (n,), device=self.images.device)
        images = self.images[pick]
        flip = torch.rand(n, device=images.device) < 0.5
        return torch.where(flip[:, None, None, None], images.flip(-1), images), self.labels[pick]


def gray(images: torch.Tensor) -> torch.Tensor:
    """Luminance (ITU-R BT.601) of (n, 3, h, w) images, repeated to 3 channels: the ControlNet's condition."""
    y = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    return y[:, None].expand(-1, 3, -1, -1)


def save_conditions(folder, size: int, seed: int = 7) -> None:
    """One grayscale crop per photo, ``size`` pixels a side, as PNGs named after the photo (NN-name.png, in
    caption order): the ControlNet's conditions in distillation and the transfer checks."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    crops = PhotoCrops(load_photos(short_side=2 * size), size, seed=seed)
    for index, (name, _) in enumerate(PHOTOS):
        luma = gray((crops.crop(index)[None] + 1) * 127.5)[0, 0]
        pixels = luma.round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{index:02d}-{name.removesuffix('.jpg')}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE, help="pixels (twice the training size: 128 "
                        "for the 64 px testbed, 512 for 256 px)")
    parser.add_argument("--conditions", type=int, metavar="SIZE",
                        help="write one grayscale crop per photo, SIZE pixels a side, into the folder --out")
    args = parser.parse_args()
    if args.conditions:
        save_conditions(args.out, args.conditions)
    else:
        save_photos(args.out, args.short_side)
