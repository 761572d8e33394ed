import re
from pathlib import Path

from clear_surgery.surgery.coverage import coverage_rows, coverage_table


def test_readme_table_is_what_coverage_prints():
    rows = coverage_rows()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    published = re.search(r"<!-- coverage-table -->\n(.*?)\n<!-- /coverage-table -->", readme, re.S).group(1)
    assert published == coverage_table(rows)
    supported = {r["family"] for r in rows if r["rewrite"] == "yes"}
    # every family reported convertible has a built-in model whose conversion is tested
    # (tests/test_rewrite.py::test_large_radius_equals_original_small_radius_differs)
    assert supported == {"FLUX.1 (FluxTransformer2DModel)", "FLUX.1 ControlNet (FluxControlNetModel)",
                         "SD3 (SD3Transformer2DModel)", "SD3.5 (SD3Transformer2DModel, dual attention)",
                         "SD3 ControlNet (SD3ControlNetModel)"}
    assert all(r["rewrite"].startswith("no: ") for r in rows if r["family"] not in supported)
