"""What FP8 costs on the trained testbed: dev with the distilled CLEAR layers (r8) in bf16, against the same
with FP8 linear layers, FP8 attention, and both: PSNR and SSIM of the images (16 prompts, 28 steps, guidance
3.5, 64x64, seed 0, as run_transfer.sh), a JSON, a table and a PNG grid.

The testbed cannot run the FP8 kernels themselves: its heads have 32 dimensions (the gluon-fp8 kernel takes
64 and 128) and torchao's FP8 needs a GPU. So the FP8 arithmetic is emulated in PyTorch, rounding where the
kernels round: the linear layers as torchao's float8 dynamic quantization with row-wise scales (weights per
output row, activations per token, to e4m3 and back, the product in the model's dtype), attention as
``fp8_emulated_attention`` (Q, K, V per batch and head, P per row; the GPU test holds the kernel to it).

    python recipes/testbed/fp8_accuracy.py --out recipes/testbed/results/fp8-r8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from clear_surgery.hub import resolve_model
from clear_surgery.hub.clear_layers import apply_layer_tensors, resolve_layers
from clear_surgery.plugins import TokenLayout
from clear_surgery.plugins.gluon_fp8_backend import E4M3, E4M3_MAX, fp8_emulated_attention
from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state
from clear_surgery.surgery.tools import image_metrics
from clear_surgery.surgery.tools.pipeline import load_pipeline
from clear_surgery.surgery.tools.quantize import fp8_targets
from clear_surgery.surgery.tools.transfer import TransferSettings, _generate, read_prompts

TESTBED = Path(__file__).parent
CONFIGS = ("FP8 linear", "FP8 attention", "FP8 linear + FP8 attention")


def rowwise_e4m3(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to e4m3 with one scale per row (its last dimension), back in its dtype."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
    return ((t.float() / scale).to(E4M3).float() * scale).to(t.dtype)


def emulate_fp8_linear(model: torch.nn.Module) -> list:
    """The family's FP8 targets rounded as torchao's row-wise float8 rounds them: weights now (in place), each
    input when called. Returns the hooks (remove them to stop rounding inputs)."""
    hooks = []
    for name in fp8_targets(model):
        module = model.get_submodule(name)
        with torch.no_grad():
            module.weight.copy_(rowwise_e4m3(module.weight))
        hooks.append(module.register_forward_pre_hook(lambda _module, args: (rowwise_e4m3(args[0]), *args[1:])))
    return hooks


def emulate_fp8_attention(model: torch.nn.Module) -> None:
    """Every plain CLEAR call of the model through the FP8 kernel's arithmetic (others as before)."""

    def fp8(call, proceed):
        if call.attn_mask is not None or call.pool_weight is not None or call.images or \
                call.query.shape[1] != call.key.shape[1]:
            return proceed(call)
        layout = TokenLayout(call.text_len, call.text_first, call.height, call.width, call.tile)
        out = fp8_emulated_attention(call.query, call.key, call.value, layout, call.radius, call.scale)
        return out.to(call.query.dtype)

    get_clear_state(model).runtime.add_route("fp8-emulated", fp8)


def grid_png(path: Path, rows: dict[str, torch.Tensor], count: int = 8) -> None:
    """One column per configuration (bf16 first), one row per image, and |difference| x 4 against bf16."""
    from PIL import Image

    base = rows["bf16"][:count]
    columns = [base] + [t[:count] for name, t in rows.items() if name != "bf16"]
    columns += [((t[:count] - base).abs() * 4).clamp(0, 1) for name, t in rows.items() if name != "bf16"]
    tiles = torch.cat([torch.cat(list(c), 1) for c in columns], 2)  # (3, count * H, columns * W)
    Image.fromarray((tiles.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (tiles.shape[2] * 2, tiles.shape[1] * 2), Image.NEAREST).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=Path, default=TESTBED / "layers" / "r8")
    parser.add_argument("--num-images", type=int, default=16)
    args = parser.parse_args(argv)
    settings = TransferSettings(read_prompts(TESTBED / "prompts.txt"), num_images=args.num_images, seed=0, steps=28,
                                guidance=3.5, height=64, width=64)
    layers = resolve_layers(args.layers)
    images = {}
    for name in ("bf16", *CONFIGS):
        pipe = load_pipeline(resolve_model(str(TESTBED / "models" / "dev")))
        pipe.to(dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        apply_clear(pipe.transformer, ClearConfig(radius=layers.radius))
        apply_layer_tensors(pipe.transformer, layers.file)
        if "linear" in name:
            emulate_fp8_linear(pipe.transformer)
        if "attention" in name:
            emulate_fp8_attention(pipe.transformer)
        images[name], _ = _generate(pipe, settings, None, name)
    rows = []
    for name in CONFIGS:
        psnr = image_metrics.psnr(images["bf16"], images[name])
        ssim = image_metrics.ssim(images["bf16"], images[name])
        rows.append(dict(config=name, psnr_db=float(np.mean(psnr)), psnr_min_db=float(np.min(psnr)),
                         ssim=float(np.mean(ssim)), per_image_psnr=psnr, per_image_ssim=ssim))
    args.out.mkdir(parents=True, exist_ok=True)
    setup = dict(model="recipes/testbed/models/dev", layers=str(args.layers), radius=layers.radius,
                 pipeline_dtype="bfloat16", arithmetic="emulated FP8 (module docstring)",
                 **{k: v for k, v in vars(settings).items() if k != "prompts"})
    (args.out / "metrics.json").write_text(json.dumps(dict(setup=setup, rows=rows), indent=1))
    table = ["| configuration (against CLEAR bf16) | PSNR dB (mean) | PSNR dB (lowest image) | SSIM |", "|---|---|---|---|"]
    table += [f"| {r['config']} | {r['psnr_db']:.2f} | {r['psnr_min_db']:.2f} | {r['ssim']:.4f} |" for r in rows]
    (args.out / "report.md").write_text("\n".join([
        f"# FP8 on the testbed: dev + CLEAR layers r{layers.radius:g}", "",
        f"{settings.num_images} images, seed 0, 28 steps, guidance 3.5, 64x64; the pipeline in bf16; FP8 "
        "arithmetic emulated (recipes/testbed/fp8_accuracy.py says how).", "", *table, "",
        "grid.png: CLEAR bf16 | FP8 linear | FP8 attention | both | |difference| x 4 of each, one row per image.",
        ""]))
    grid_png(args.out / "grid.png", images)
    print("\n".join(table))


if __name__ == "__main__":
    main()
