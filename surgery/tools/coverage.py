"""Coverage of MMDiT families in the installed diffusers: analysis (and rewrite where it fits) on
tiny configs. ``clear-surgery coverage`` prints the table README.md carries (a test keeps them equal).

The rows are the tiny models the family modules declare (``TINY_MODELS``, and those of architectures
that do not convert in ``families/unconverted.py``); whether a row converts is decided by converting and
comparing."""

from __future__ import annotations

import sys
import warnings

import torch

from clear_surgery.surgery import (ClearConfig, analyze, apply_clear, build_tiny_model, example_inputs, remove_clear,
                                   tiny_models)
from clear_surgery.surgery.core.families import EXAMPLE_GRID, EXAMPLE_TEXT_TOKENS
from clear_surgery.surgery.core.rewrite import flat_output

T, GRID = EXAMPLE_TEXT_TOKENS, EXAMPLE_GRID  # the example call's text tokens and image grid


def _rewrite_check(model, inputs, report) -> str:
    """'converts' when the rewrite (with its re-trace check) succeeds and, with a radius covering the
    grid, the converted model's output equals the original's; else 'cannot: ' and the reason."""
    inputs = inputs if inputs is not None else example_inputs(model)

    def output():
        with torch.no_grad():
            return flat_output(model(**inputs))

    expected = output()
    try:
        apply_clear(model, ClearConfig(radius=1000), analysis=report)
    except Exception as err:
        return f"cannot: rewrite failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
    try:
        got = output()
    finally:
        remove_clear(model)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        return f"cannot: converted output differs from the original (max abs diff {(got - expected).abs().max():.2e})"
    return CONVERTS


def coverage_rows(progress: bool = False) -> list[dict]:
    """One row per family; ``progress``: a bar on stderr, one step per family."""
    from tqdm.auto import tqdm

    rows = []
    for family in tqdm(tiny_models(), desc="coverage", unit="family", disable=not progress, file=sys.stderr):
        row = {"family": family}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. zero-size layers of the tiny configs
                model, inputs, *tokens = build_tiny_model(family)  # optionally (text, image tokens) of the call
            defaults = (T, GRID[0] * GRID[1])
            text, image = (*tokens, *defaults[len(tokens):])
            report = analyze(model) if inputs is None else analyze(model, inputs, text_tokens=text, image_tokens=image)
        except Exception as err:  # reported, never hidden
            row.update(sites="-", layout="-", rewrite=f"no: analysis failed: {type(err).__name__}: "
                                                      f"{str(err).splitlines()[0][:90]}")
            rows.append(row)
            continue
        kinds = {}
        for site in report.sites:
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
        orders = sorted({s.order for s in report.joint_sites})
        reasons = sorted({s.reason for s in report.joint_sites if not s.supported})
        row["sites"] = (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none") + (
            "" if report.method == "torch.export" else f" (analyzed at {report.method})")
        row["layout"] = ", ".join(orders) or "-"
        if report.joint_sites and not reasons:
            row["rewrite"] = _rewrite_check(model, inputs, report)
        elif reasons:
            row["rewrite"] = "cannot: " + "; ".join(reasons)
        elif all(s.kind == "cross" and s.key_tokens == report.text_tokens or s.kind == "text" for s in report.sites):
            row["rewrite"] = ("not applicable: no scaled-dot-product attention over image keys (only cross-attention "
                              "to the text; other attention is not an SDPA call, e.g. linear attention)")
        else:
            others = sorted({s.reason for s in report.sites if s.kind in ("other", "cross") and s.reason})
            row["rewrite"] = "cannot: no joint text-image attention" + (f" ({'; '.join(others)})" if others else "")
        rows.append(row)
    return rows


CONVERTS = "converts"


def coverage_table(rows=None, progress: bool = False) -> str:
    rows = rows or coverage_rows(progress)
    lines = ["| family | attention sites (tiny config) | segment order | CLEAR |", "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['sites']} | {r['layout']} | {r['rewrite']} |" for r in rows]
    return "\n".join(lines)
