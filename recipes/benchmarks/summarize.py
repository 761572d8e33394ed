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


def step_table():
    print("| res | tokens | dense ms | CLEAR r16 (triton, tiled) ms | speedup |")
    print("|---|---|---|---|---|")
    for r in rows("h200-run3", "step.json"):
        print(f"| {r['res']} | {r['tokens']} | {r['dense_ms']:.0f} | {r['clear_ms']:.0f} | {r['speedup']:.2f}× |")


if __name__ == "__main__":
    attention_table([
        ("h200-run1", lambda r: r["res"] == 1024 or r["backend"] in ("dense-cudnn", "dense-flash", "triton-tiled")
         or (r["res"] == 2048 and r["radius"] == 8)),
        ("h200-run3", lambda r: True),
        ("h200-run4", lambda r: r["backend"] == "triton-tiled" and r["radius"] != 16),
    ])
    print()
    step_table()
