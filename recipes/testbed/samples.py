"""Did the testbed learn? A PNG with one row per caption: a crop of the source photo, then dev
(28 steps, guidance 3.5), schnell (4 steps) and dev + ControlNet (conditioned on the grayscale of
the crop), two seeds each; and a JSON with how often a sample is nearest to its own source photo.

    python recipes/testbed/samples.py --models recipes/testbed/models --out recipes/testbed/samples
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from photos import CAPTIONS, PhotoCrops, load_photos  # noqa: E402
import train  # noqa: E402
from train import DEV_GUIDANCE, DEV_STEPS, SCHNELL_STEPS, TEXT_LEN, gray  # noqa: E402

SEEDS = (0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(to_uint8(image[None])[0])


def color_signature(images: np.ndarray) -> np.ndarray:
    """A crude identity of a picture: its 8x8 thumbnail (colors and layout), for nearest-photo matching."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(t, 8).flatten(1).numpy()


@torch.no_grad()
def main(argv=None):
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = args.models / "training.json"  # the size the models were trained at
    size = json.loads(record.read_text()).get("size", train.SIZE) if record.exists() else train.SIZE
    dev = diffusers.FluxPipeline.from_pretrained(args.models / "dev")
    schnell = diffusers.FluxPipeline.from_pretrained(args.models / "schnell")
    controlnet = diffusers.FluxControlNetModel.from_pretrained(args.models / "controlnet")
    control = diffusers.FluxControlNetPipeline.from_pipe(dev, controlnet=controlnet)
    for pipe in (dev, schnell, control):
        pipe.set_progress_bar_config(disable=True)
    crops = PhotoCrops(load_photos(short_side=2 * size), size, seed=123)
    common = dict(height=size, width=size, max_sequence_length=TEXT_LEN, output_type="np")
    rows, references, generated = [], [], {"dev": [], "schnell": [], "controlnet": []}
    for index, caption in enumerate(CAPTIONS):
        crop = crops.crop(index)
        references.append(to_uint8(crop[None])[0])
        row = [references[-1]]
        for name in generated:
            for seed in SEEDS:
                g = torch.Generator().manual_seed(seed)
                if name == "dev":
                    out = dev(caption, num_inference_steps=DEV_STEPS, guidance_scale=DEV_GUIDANCE, generator=g, **common)
                elif name == "schnell":
                    out = schnell(caption, num_inference_steps=SCHNELL_STEPS, guidance_scale=0.0, generator=g, **common)
                else:
                    out = control(caption, control_image=pil(gray(crop[None])[0]), num_inference_steps=DEV_STEPS,
                                  guidance_scale=DEV_GUIDANCE, generator=g, **common)
                image = (out.images[0] * 255).round().astype(np.uint8)
                generated[name].append((index, image))
                row.append(image)
        rows.append(np.concatenate(row, axis=1))
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out / "samples.png")
    # nearest source photo (over many crops of each photo) for every sample
    many = PhotoCrops(load_photos(short_side=2 * size), size, seed=7)
    bank = np.stack([color_signature(to_uint8(torch.stack([many.crop(i) for _ in range(32)]))) for i in
                     range(len(CAPTIONS))])  # (photos, 32, features)
    report = {}
    for name, samples in generated.items():
        signatures = color_signature(np.stack([image for _, image in samples]))
        dist = ((signatures[:, None, None] - bank[None]) ** 2).sum(-1).min(-1)  # (samples, photos)
        hits = [int(dist[k].argmin() == index) for k, (index, _) in enumerate(samples)]
        report[name] = dict(samples=len(hits), nearest_is_own_photo=sum(hits), chance=round(len(hits) / len(CAPTIONS), 2))
    (args.out / "samples.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
