"""One conformance test over every registered backend (backend_conformance.py): each runs against the float64
reference on every feature it declares and refuses the others. Reference and flex run here; the Triton
backends under TRITON_INTERPRET=1 in a subprocess; on a GPU every backend runs on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend_conformance import check_backend
from clear_surgery.plugins import BACKENDS, Backend, TokenLayout, choose_backend, reference_attention, register_backend
from clear_surgery.plugins.backends import BACKWARD, FP8, LSE, TEXT_BIAS, recompute_backward
from clear_surgery.plugins.reference import reference_reason

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
FP8_TOLERANCE = 0.07  # relative RMS error of e4m3 attention (test_gluon_fp8.py says why)
UNDER_INTERPRETER = ("triton", "triton-aot")  # the CPU can run these only with TRITON_INTERPRET=1


def assert_conforms(result: dict) -> None:
    assert result["runs"], result
    tolerance = FP8_TOLERANCE if FP8 in result["features"] else TOLERANCE[result["dtype"]]
    for feature, outcome in result.items():
        if feature in ("runs", "dtype", "features", "backend"):
            continue
        if feature in ("plain", FP8) or feature in result["features"]:
            assert isinstance(outcome, float) and outcome < tolerance, (feature, result)
        else:
            assert outcome == "refused", (feature, result)


@pytest.mark.parametrize("name", [n for n in BACKENDS if n not in UNDER_INTERPRETER])
def test_backend_conforms_on_cpu(name):
    result = check_backend(name, "cpu")
    if not result["runs"]:
        pytest.skip(f"{name} cannot run on this CPU: {result['why']}")
    assert_conforms(result)


def test_triton_backends_conform_under_the_interpreter():
    names = [n for n in UNDER_INTERPRETER if n in BACKENDS]
    if not names:
        pytest.skip("triton is not installed")
    script = Path(__file__).with_name("backend_conformance.py")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(script.parent))
    done = subprocess.run([sys.executable, str(script), "cpu", *names], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["backend"] for r in results] == names
    for result in results:
        assert_conforms(result)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_conforms_on_the_gpu(name):
    result = check_backend(name, "cuda")
    if not result["runs"]:
        pytest.skip(f"{name} cannot run on this GPU: {result['why']}")
    assert_conforms(result)


def _inputs(layout):
    return [torch.randn(1, layout.seq_len, 2, 16) for _ in range(3)]


def test_a_registered_backend_is_chosen_by_auto_by_priority():
    layout = TokenLayout(3, True, 4, 5)
    q, k, v = _inputs(layout)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return reference_attention(*args, **kwargs)

    mine = Backend("test-cpu-kernel", counted, reference_reason, recompute_backward(counted), {LSE, BACKWARD},
                   {"cpu": 1000})
    register_backend(mine)
    try:
        assert choose_backend("auto", q, k, v, layout, 2.0) is mine  # above every built-in priority
        # a call needing a feature it does not declare goes to the next backend by priority
        assert choose_backend("auto", q, k, v, layout, 2.0, needs={TEXT_BIAS}).name == "reference"
        assert_conforms(check_backend("test-cpu-kernel", "cpu"))  # the conformance test covers it at once
        register_backend(Backend("test-cpu-kernel", counted, reference_reason, recompute_backward(counted),
                                 {LSE, BACKWARD}, {"cpu": 1}))  # now below reference and flex
        assert choose_backend("auto", q, k, v, layout, 2.0).name == "reference"
    finally:
        BACKENDS.pop("test-cpu-kernel")
    assert calls


def test_an_fp8_backend_is_held_to_fp8s_tolerance_and_never_runs_unasked():
    def rounded(q, k, v, layout, radius, scale=None, **options):  # attention of e4m3-rounded inputs
        e4m3 = [(t / t.abs().amax() * 448).to(torch.float8_e4m3fn).to(t.dtype) * (t.abs().amax() / 448)
                for t in (q, k, v)]
        return reference_attention(*e4m3, layout, radius, scale, **options)

    register_backend(Backend("test-fp8", rounded, reference_reason, None, {FP8}, {"cpu": 1000}))
    try:
        result = check_backend("test-fp8", "cpu")
        q, k, v = _inputs(TokenLayout(3, True, 4, 5))
        assert choose_backend("auto", q, k, v, TokenLayout(3, True, 4, 5), 2.0).name != "test-fp8"
    finally:
        BACKENDS.pop("test-fp8")
    assert result["unasked"] == "refused" and 1e-3 < result["plain"] < 0.07
    assert_conforms(result)


def test_a_backend_that_breaks_a_declared_feature_fails_conformance():
    def wrong_bias(q, k, v, layout, radius, scale=None, *, text_bias=None, **options):
        return reference_attention(q, k, v, layout, radius, scale, **options)  # ignores the text bias

    register_backend(Backend("test-broken", wrong_bias, reference_reason, None, {TEXT_BIAS}, {}))
    try:
        result = check_backend("test-broken", "cpu")
    finally:
        BACKENDS.pop("test-broken")
    assert result["plain"] < 1e-6 and result[TEXT_BIAS] > 1e-2
    with pytest.raises(AssertionError):
        assert_conforms(result)


def test_declared_features_must_be_known_and_backward_declared_with_one():
    with pytest.raises(ValueError, match="unknown features"):
        Backend("x", reference_attention, reference_reason, None, {"int4"})
    with pytest.raises(ValueError, match="declare 'backward'"):
        Backend("x", reference_attention, reference_reason, None, {BACKWARD})
    with pytest.raises(ValueError, match="cannot be named"):
        register_backend(Backend("auto", reference_attention, reference_reason))
