"""Collect the transfer reports of run_transfer.sh into results/README.md: mean PSNR / SSIM against
the dense original, the gain of distilled over zero-shot layers, and how much of dev's gain each
transfer target keeps.

    python recipes/testbed/summarize.py recipes/testbed/results
"""

import json
import sys
from pathlib import Path

# (row label, zero-shot report, distilled report) per radius
ROWS = (
    ("dev", "dev-zero-shot", "dev-distilled"),
    ("schnell, layers replace schnell's tensors", "schnell-zero-shot", "schnell-distilled"),
    ("schnell, layers' changes added to schnell's tensors (delta)", "schnell-zero-shot", "schnell-distilled-delta"),
    ("dev + ControlNet, ControlNet attention zero-shot CLEAR", "controlnet-zero-shot", "controlnet-distilled"),
    ("dev + ControlNet, ControlNet also gets the layers' changes", "controlnet-zero-shot",
     "controlnet-distilled-layers"),
    ("dev + ControlNet, ControlNet attention dense", "controlnet-dense-zero-shot", "controlnet-dense-distilled"),
    # layers healed with the ControlNet in the loop (distill-r8-controlnet.toml), and half of the batches with it
    ("dev + ControlNet (attention dense), layers healed with the ControlNet", "controlnet-dense-zero-shot",
     "controlnet-dense-cnloop"),
    ("dev alone, layers healed with the ControlNet", "dev-zero-shot", "dev-cnloop"),
    ("dev + ControlNet (attention dense), layers healed half with the ControlNet", "controlnet-dense-zero-shot",
     "controlnet-dense-cnhalf"),
    ("dev alone, layers healed half with the ControlNet", "dev-zero-shot", "dev-cnhalf"),
    ("dev + ControlNet (attention CLEAR), layers and the ControlNet's attention healed together",
     "controlnet-zero-shot", "controlnet-cntrained"),
    ("dev alone, layers healed with the ControlNet's attention trained too", "dev-zero-shot", "dev-cntrained"),
)


def main(folder: Path) -> None:
    def summary(name, r):
        return json.loads((folder / f"{name}-r{r}" / "metrics.json").read_text())["summary"]

    radii = sorted({int(p.name.rsplit("-r", 1)[1]) for p in folder.glob("*-r*") if p.is_dir()
                    and p.name.rsplit("-r", 1)[1].isdigit()}, reverse=True)
    lines = ["| target | r | PSNR zero-shot (dB) | PSNR distilled (dB) | gain (dB) | share of dev's gain | "
             "SSIM zero-shot | SSIM distilled | latent MSE zero-shot | latent MSE distilled | condition MSE "
             "dense / zero-shot / distilled |", "|" + "---|" * 11]
    table = {}
    for r in radii:
        dev_gain = summary("dev-distilled", r)["psnr"] - summary("dev-zero-shot", r)["psnr"]
        for label, zero_name, distilled_name in ROWS:
            if not (folder / f"{distilled_name}-r{r}").is_dir():  # not every check ran at every radius
                continue
            z, d = summary(zero_name, r), summary(distilled_name, r)
            gain = d["psnr"] - z["psnr"]
            share = gain / dev_gain if dev_gain else float("nan")
            cond = (f"{z['condition_mse_original']:.5f} / {z['condition_mse_clear']:.5f} / "
                    f"{d['condition_mse_clear']:.5f}" if "condition_mse_clear" in d else "")
            lines.append(f"| {label} | {r} | {z['psnr']:.2f} | {d['psnr']:.2f} | {gain:+.2f} | "
                         f"{'' if label == 'dev' else f'{share:.0%}'} | {z['ssim']:.4f} | {d['ssim']:.4f} | "
                         f"{z['latent_mse']:.4g} | {d['latent_mse']:.4g} | {cond} |")
            table[f"{distilled_name}-r{r}"] = dict(label=label, zero_shot=z, distilled=d, gain_db=gain,
                                                   share_of_dev_gain=share)
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
