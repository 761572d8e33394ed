"""Collect the transfer reports of run_transfer.sh into results/README.md: mean PSNR / SSIM against
the dense original, the gain of distilled over zero-shot layers, and how much of dev's gain each
transfer target keeps.

    python recipes/testbed/summarize.py recipes/testbed/results
"""

import json
import sys
from pathlib import Path

TARGETS = ("dev", "schnell", "controlnet")


def main(folder: Path) -> None:
    def summary(target, mode, r):
        return json.loads((folder / f"{target}-{mode}-r{r}" / "metrics.json").read_text())["summary"]

    radii = sorted({int(p.name.rsplit("-r", 1)[1]) for p in folder.glob("*-r*") if p.is_dir()}, reverse=True)
    lines = ["| target | r | PSNR zero-shot (dB) | PSNR distilled (dB) | gain (dB) | share of dev's gain | "
             "SSIM zero-shot | SSIM distilled | latent MSE zero-shot | latent MSE distilled | condition MSE "
             "dense / zero-shot / distilled |", "|" + "---|" * 11]
    table = {}
    for r in radii:
        dev_gain = summary("dev", "distilled", r)["psnr"] - summary("dev", "zero-shot", r)["psnr"]
        for target in TARGETS:
            z, d = summary(target, "zero-shot", r), summary(target, "distilled", r)
            gain = d["psnr"] - z["psnr"]
            share = gain / dev_gain if dev_gain else float("nan")
            cond = (f"{z['condition_mse_original']:.4f} / {z['condition_mse_clear']:.4f} / "
                    f"{d['condition_mse_clear']:.4f}" if "condition_mse_clear" in d else "")
            lines.append(f"| {target} | {r} | {z['psnr']:.2f} | {d['psnr']:.2f} | {gain:+.2f} | "
                         f"{'' if target == 'dev' else f'{share:.0%}'} | {z['ssim']:.4f} | {d['ssim']:.4f} | "
                         f"{z['latent_mse']:.4g} | {d['latent_mse']:.4g} | {cond} |")
            table[f"{target}-r{r}"] = dict(zero_shot=z, distilled=d, gain_db=gain, share_of_dev_gain=share)
    (folder / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    text = (folder / "README.md").read_text() if (folder / "README.md").exists() else ""
    start, end = "<!-- table -->", "<!-- /table -->"
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += block + "\n"
    (folder / "README.md").write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
