"""``clear-surgery check-transfer``: do CLEAR layers work on another model (schnell, a ControlNet)?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_surgery.surgery.tools.arguments import check, check_layers_mode, in_range, output_folder, run_device

from .app import MODEL_HELP, app, check_sources, user_errors


@app.command("check-transfer")
def check_transfer(
    target: str = typer.Option(..., "--target", "-m", help="the dense model the layers should work on: "
                               + MODEL_HELP.split(", a converted")[0] + " (with a pipeline around it)"),
    clear_layers: Optional[str] = typer.Option(None, "--clear-layers", help="trained CLEAR layers: a CLEAR-layers "
                                               "folder or safetensors file (local or Hub); omit for zero-shot CLEAR"),
    radius: Optional[float] = typer.Option(None, "--radius", "-r", help="radius (default: the layers'); alone: "
                                           "zero-shot CLEAR"),
    layers_mode: str = typer.Option("replace", help="replace: the target's attention tensors become the layers'; "
                                    "delta: the target's own plus what the layers changed in their base model"),
    layers_base: Optional[str] = typer.Option(None, help="delta: the model the layers were made from (default: "
                                              "the one their folder records)"),
    controlnet: Optional[str] = typer.Option(None, help="a ControlNet model for the target (folder or Hub id)"),
    control_images: Optional[Path] = typer.Option(None, help="condition images for the ControlNet (a folder, used "
                                                             "in name order, or one file)"),
    condition: str = typer.Option("gray", help="how the condition is recomputed from an output: gray or edges"),
    controlnet_attention: Optional[str] = typer.Option(None, help="the ControlNet's own attention: layers (CLEAR "
                                                      "with the layers' changes on the blocks it shares with the "
                                                      "target; the default with --clear-layers), clear (zero-shot "
                                                      "CLEAR; the default without), dense, or trained (with "
                                                      "--controlnet-layers)"),
    controlnet_layers: Optional[str] = typer.Option(None, help="the ControlNet's own CLEAR layers (what distill writes "
                                                    "to OUT/clear-layers-controlnet when the ControlNet's attention "
                                                    "trains too); implies --controlnet-attention trained"),
    prompts: Path = typer.Option(..., help="text file, one prompt per line (cycled)"),
    num_images: int = typer.Option(4, min=1, help="image pairs to make"),
    seed: int = typer.Option(0, min=0, help="image i uses seed + i"),
    steps: Optional[int] = typer.Option(None, min=1, help="denoising steps (default: the pipeline's)"),
    guidance: Optional[float] = typer.Option(None, help="guidance scale >= 0 (default: the pipeline's)"),
    height: Optional[int] = typer.Option(None, min=1, help="default: the pipeline's"),
    width: Optional[int] = typer.Option(None, min=1, help="default: the pipeline's"),
    allow_radius_change: bool = typer.Option(False, help="use layers made for another radius at --radius"),
    device: Optional[str] = typer.Option(None, help="where the pipeline runs (cpu, cuda, cuda:1, ...); default: "
                                         "cuda when there is a GPU, else cpu"),
    quantize: Optional[str] = typer.Option(None, help="fp8: the CLEAR side's linear layers in FP8 (torchao; a GPU "
                                           "with FP8 tensor cores): what CLEAR + FP8 loses against the dense model as "
                                           "stored (with --radius inf: what FP8 alone loses)"),
    dense_cache: Optional[Path] = typer.Option(None, help="a folder that keeps the dense images: a later check with "
                                               "the same target (same weight files), ControlNet, conditions, "
                                               "prompts, seeds, settings and device reuses them"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder (written atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing report folder"),
):
    """Check that CLEAR layers transfer: the same prompts, seeds and conditions through the dense target
    and the CLEAR target; PSNR, SSIM, latent MSE (and the condition error with a ControlNet)."""
    with user_errors():
        in_range("--radius", radius, 0)
        check(clear_layers is not None or radius is not None,
              "give --clear-layers (trained CLEAR layers) or --radius (zero-shot CLEAR)")
        check((controlnet is None) == (control_images is None), "--controlnet and --control-images go together")
        controlnet_attention = controlnet_attention or ("trained" if controlnet_layers else
                                                        "layers" if clear_layers else "clear")
        check(controlnet_attention in ("dense", "clear", "layers", "trained"), "--controlnet-attention must be dense, "
              f"clear, layers or trained, got {controlnet_attention!r}")
        check((controlnet_attention == "trained") == (controlnet_layers is not None),
              "--controlnet-layers and --controlnet-attention trained go together")
        check(controlnet_layers is None or controlnet is not None, "--controlnet-layers needs --controlnet")
        check(controlnet_attention != "layers" or clear_layers is not None,
              "--controlnet-attention layers needs --clear-layers")
        check_layers_mode(layers_mode, clear_layers)
        check(dense_cache is None or not dense_cache.exists() or dense_cache.is_dir(),
              f"--dense-cache {dense_cache} is a file; give a folder (made if missing)")
        device = run_device("--device", device)
        from clear_surgery.surgery.tools.quantize import check_quantize

        check_quantize("--quantize", quantize, device)
        output_folder("--out", out, overwrite)
        from clear_surgery.surgery.tools.transfer import TransferSettings, read_prompts

        settings = TransferSettings(prompts=read_prompts(prompts), num_images=num_images, seed=seed, steps=steps,
                                    guidance=guidance, height=height, width=width, condition=condition)
        check_sources(target, clear_layers)
        check_sources(controlnet, controlnet_layers)
        check_sources(layers_base)
        from clear_surgery.surgery.tools.transfer import check_transfer as run

        metrics = run(target, out, settings, clear_layers=clear_layers, radius=radius, controlnet=controlnet,
                      control_images=control_images, layers_mode=layers_mode, layers_base=layers_base,
                      controlnet_attention=controlnet_attention, controlnet_layers=controlnet_layers, quantize=quantize,
                      allow_radius_change=allow_radius_change, overwrite=overwrite, device=device,
                      dense_cache=dense_cache)
    s = metrics["summary"]
    typer.echo(f"{metrics['setup']['mode']} r={metrics['setup']['radius']:g}: PSNR {s['psnr']:.2f} dB, "
               f"SSIM {s['ssim']:.4f}, latent MSE {s['latent_mse']:.4g}"
               + (f", condition MSE {s['condition_mse_original']:.4g} (dense) -> {s['condition_mse_clear']:.4g} "
                  "(CLEAR)" if "condition_mse_clear" in s else ""))
    typer.echo(f"wrote {out}/metrics.json, report.md, grid.png")
