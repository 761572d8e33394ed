"""Markdown tables from the committed H200 runs (see README.md here for which run measured what)."""
import json
from pathlib import Path

HERE = Path(__file__).parent


def rows(run, name="attention.json"):
    return json.loads((HERE / run / name).read_text())["rows"]


# In h200-run1 the flex backend hit dynamo's recompile limit from 2048² r16 on and fell back to
# its unfused path (fixed since): its flex rows there are left out, and so is the ratio to them.
INVALID_FLEX = {("h200-run1", 2048, 16.0), ("h200-run1", 2048, 32.0)}


def attention_table(selected):
    print("| res | r | backend | ms | eff. TFLOP/s | × floor (cuDNN rate) | × floor (FA2 rate) | vs flex-raster (same run) | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, keep in selected:
        for r in rows(run):
            if "ms" not in r or not keep(r):
                continue
            tf = r.get("tflops_effective", r.get("tflops"))
            if (run, r["res"], r["radius"]) in INVALID_FLEX:
                r.pop("speedup_vs_flex_raster", None)
            fmt = lambda k: f"{r[k]:.2f}" if k in r else "-"
            print(f"| {r['res']} | {r['radius'] or '-'} | {r['backend']} | {r['ms']:.2f} | {tf:.0f} | "
                  f"{fmt('x_floor_dense-cudnn')} | {fmt('x_floor_dense-flash')} | {fmt('speedup_vs_flex_raster')} | {run} |")


def step_table(run="h200-run3"):
    print("| res | tokens | dense ms | CLEAR r16 (triton, tiled) ms | speedup |")
    print("|---|---|---|---|---|")
    for r in rows(run, "step.json"):
        print(f"| {r['res']} | {r['tokens']} | {r['dense_ms']:.0f} | {r['clear_ms']:.0f} | {r['speedup']:.2f}× |")


def profile_table(run="h200-run6"):
    data = json.loads((HERE / run / "profile.json").read_text())
    variants = list(dict.fromkeys(r["variant"] for r in data))
    print("| res | r | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for key in dict.fromkeys((r["res"], r["radius"]) for r in data):
        cells = {r["variant"]: r for r in data if (r["res"], r["radius"]) == key}
        fmt = lambda v: "-" if v not in cells else (f"{cells[v]['ms']:.2f} ms" + (
            f" ({cells[v]['tflops']:.0f} TFLOP/s)" if "tflops" in cells[v] else ""))
        print(f"| {key[0]}² | {key[1]} | " + " | ".join(fmt(v) for v in variants) + " |")


def distill_table(run="h200-run6"):
    print("| backend | res | batch | trained params | step s (median after 2 warm-up) | peak GiB | weights GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows(run, "distill.json"):
        print(f"| {r['backend']} | {r['res']}² | {r['batch']} | {r['trained_params'] / 1e9:.2f} B | {r['step_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {r['weights_gib']:.1f} |")


def generate_table(run="h200-run6"):
    print("| res | steps | denoise s | VAE decode s (tiled) | peak GiB denoise | peak GiB decode |")
    print("|---|---|---|---|---|---|")
    for r in rows(run, "generate.json"):
        print(f"| {r['res']}² | {r['steps']} | {r['denoise_s']:.1f} | {r['decode_s']:.1f} | {r['peak_gib_denoise']:.1f} | "
              f"{r['peak_gib_decode']:.1f} |")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] in (["current"], ["run6"]):  # current: h200-run7 (kernel), h200-run6 (distill, generate)
        run = "h200-run7" if sys.argv[1] == "current" else "h200-run6"
        attention_table([(run, lambda r: True)])
        print()
        step_table(run)
        print()
        profile_table(run)
        if sys.argv[1] == "current":
            print()
            distill_table()
            print()
            generate_table()
        sys.exit()
    attention_table([
        ("h200-run1", lambda r: r["res"] == 1024 or r["backend"] in ("dense-cudnn", "dense-flash", "triton-tiled")
         or (r["res"] == 2048 and r["radius"] == 8)),
        ("h200-run3", lambda r: True),
        ("h200-run4", lambda r: r["backend"] == "triton-tiled" and r["radius"] != 16),
    ])
    print()
    step_table()
