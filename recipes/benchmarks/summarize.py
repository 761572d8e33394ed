"""Markdown tables from the committed H200 runs (see README.md here for which run measured what)."""
import json
from pathlib import Path

HERE = Path(__file__).parent


def load(run, name):
    return json.loads((HERE / run / name).read_text())


def rows(run, name="attention.json"):
    return load(run, name)["rows"]


# In h200-run1 the flex backend hit dynamo's recompile limit from 2048² r16 on and fell back to
# its unfused path (fixed since): its flex rows there are left out, and so is the ratio to them.
INVALID_FLEX = {("h200-run1", 2048, 16.0), ("h200-run1", 2048, 32.0)}


def table(columns, lines):
    """One markdown table: a header row, the separator, then the rows (lists of cell strings)."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def attention_table(selected):
    def lines():
        for run, keep in selected:
            for r in rows(run):
                if "ms" not in r or not keep(r):
                    continue
                tf = r.get("tflops_effective", r.get("tflops"))
                if (run, r["res"], r["radius"]) in INVALID_FLEX:
                    r.pop("speedup_vs_flex_raster", None)
                fmt = lambda k: f"{r[k]:.2f}" if k in r else "-"
                yield [str(r["res"]), str(r["radius"] or "-"), r["backend"], f"{r['ms']:.2f}", f"{tf:.0f}",
                       fmt("x_floor_dense-cudnn"), fmt("x_floor_dense-flash"), fmt("speedup_vs_flex_raster"), run]

    table(["res", "r", "backend", "ms", "eff. TFLOP/s", "× floor (cuDNN rate)", "× floor (FA2 rate)",
           "vs flex-raster (same run)", "run"], lines())


def step_table(run="h200-run3"):
    table(["res", "tokens", "dense ms", "CLEAR r16 (triton, tiled) ms", "speedup"],
          ([str(r["res"]), str(r["tokens"]), f"{r['dense_ms']:.0f}", f"{r['clear_ms']:.0f}", f"{r['speedup']:.2f}×"]
           for r in rows(run, "step.json")))


def profile_table(run="h200-run6"):
    data = load(run, "profile.json")
    variants = list(dict.fromkeys(r["variant"] for r in data))

    def cell(cells, v):
        if v not in cells:
            return "-"
        tflops = f" ({cells[v]['tflops']:.0f} TFLOP/s)" if "tflops" in cells[v] else ""
        return f"{cells[v]['ms']:.2f} ms{tflops}"

    def lines():
        for key in dict.fromkeys((r["res"], r["radius"]) for r in data):
            cells = {r["variant"]: r for r in data if (r["res"], r["radius"]) == key}
            yield [f"{key[0]}²", str(key[1]), *(cell(cells, v) for v in variants)]

    table(["res", "r", *variants], lines())


def tune_table(run="h200-run8"):
    data = load(run, "tune.json")
    configs = list(dict.fromkeys(json.dumps(r["config"]) for r in data))
    cases = list(dict.fromkeys((r["res"], r["radius"]) for r in data))
    ms = {(json.dumps(r["config"]), r["res"], r["radius"]): r["ms"] for r in data}

    def cell(config, res, radius):
        if radius != "dense":
            return f"{ms[config, res, radius]:.2f} ms"
        tokens = 512 + (res // 16) ** 2  # every key visible: the kernel as a dense attention
        return f"{ms[config, res, radius]:.1f} ms ({4.0 * tokens**2 * 128 * 24 / ms[config, res, radius] / 1e9:.0f} TFLOP/s)"

    def lines():
        for config in configs:
            bm, bn, seg, warps, stages, (th, tw) = json.loads(config)
            yield [f"{bm}/{bn}/{seg}/{warps}/{stages}, {th}×{tw}", *(cell(config, *case) for case in cases)]

    table(["BLOCK_M/BLOCK_N/segment BLOCK_N/warps/stages, tile",
           *(f"{res}² " + ("every key visible" if radius == "dense" else f"r{radius}") for res, radius in cases)], lines())


def step_profile_table(run="h200-run8"):
    data = load(run, "profile_step.json")
    categories = list(dict.fromkeys([*data["dense"], *data["clear"]]))
    table(["model", *categories, "total"],
          ([kind, *(f"{data[kind].get(c, 0):.0f} ms" for c in categories), f"{data[kind + '_total_ms']:.0f} ms"]
           for kind in ("dense", "clear")))


def compiled_step_table(run="h200-run8"):
    table(["res", "dense ms (compiled)", "CLEAR r16 ms (compiled)", "speedup"],
          ([f"{r['res']}²", f"{r['dense_ms']:.0f}", f"{r['clear_ms']:.0f}", f"{r['speedup']:.2f}×"]
           for r in load(run, "step_compiled.json")))


def distill_table(run="h200-run6"):
    table(["backend", "res", "batch", "trained params", "step s (median after 2 warm-up)", "peak GiB", "weights GiB"],
          ([r["backend"], f"{r['res']}²", str(r["batch"]), f"{r['trained_params'] / 1e9:.2f} B", f"{r['step_s']:.2f}",
            f"{r['peak_gib']:.1f}", f"{r['weights_gib']:.1f}"] for r in rows(run, "distill.json")))


def generate_table(run="h200-run6"):
    table(["res", "steps", "denoise s", "VAE decode s (tiled)", "peak GiB denoise", "peak GiB decode"],
          ([f"{r['res']}²", str(r["steps"]), f"{r['denoise_s']:.1f}", f"{r['decode_s']:.1f}",
            f"{r['peak_gib_denoise']:.1f}", f"{r['peak_gib_decode']:.1f}"] for r in rows(run, "generate.json")))


def whole_run(run):
    """Every row of one run's attention.json."""
    attention_table([(run, lambda r: True)])


VIEWS = {  # argument -> the tables it prints
    # current: h200-run8 (kernel, third session), h200-run6 (distill, generate)
    "current": [lambda: whole_run("h200-run8"), lambda: step_table("h200-run8"), step_profile_table,
                compiled_step_table, lambda: profile_table("h200-run8"), tune_table, distill_table, generate_table],
    # the same kernel with dense-flash in the run: floors at both dense rates
    "run8b": [lambda: whole_run("h200-run8b"), lambda: tune_table("h200-run8b")],
    **{name: [lambda run=f"h200-{name}": whole_run(run), lambda run=f"h200-{name}": step_table(run),
              lambda run=f"h200-{name}": profile_table(run)] for name in ("run7", "run6")},
    # first session: h200-run1..4
    "": [lambda: attention_table([
        ("h200-run1", lambda r: r["res"] == 1024 or r["backend"] in ("dense-cudnn", "dense-flash", "triton-tiled")
         or (r["res"] == 2048 and r["radius"] == 8)),
        ("h200-run3", lambda r: True),
        ("h200-run4", lambda r: r["backend"] == "triton-tiled" and r["radius"] != 16),
    ]), step_table],
}

if __name__ == "__main__":
    import sys

    shows = VIEWS[sys.argv[1] if len(sys.argv) > 1 else ""]
    for i, show in enumerate(shows):
        show()
        if i < len(shows) - 1:
            print()
