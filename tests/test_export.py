"""Deployment: ONNX files with ClearAttention nodes (run on CPU by onnx's ReferenceEvaluator), the
TensorRT plugin's fields and AOT step, and clean failures of `clear-surgery export`."""

import inspect
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clear_surgery.export import export_model
from clear_surgery.export.onnx import ATTRIBUTES, clear_nodes, node_attributes, reference_session
from clear_surgery.hub import load_model, save_converted
from clear_surgery.plugins import tensorrt_plugin
from clear_surgery.surgery import ClearConfig, apply_clear, load_builtin
from clear_surgery.surgery.cli import app
from conftest import rel_err, run_in_process

SIZES = {"min": "32x32", "opt": "48x64", "max": "128x128"}


def converted(tmp_path, name, **config):
    model = load_builtin(name)
    apply_clear(model, ClearConfig(radius=2.5, **config))
    save_converted(model, tmp_path / f"{name}-clear", base_model={"id": f"builtin:{name}"})
    return tmp_path / f"{name}-clear"


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    """tiny FLUX at r = 2.5 exported once to ONNX in raster order (``<root>/onnx``): several tests read it."""
    root = tmp_path_factory.mktemp("plain-export")
    export_model(str(converted(root, "tiny-flux")), root / "onnx", "onnx", sizes=SIZES, text_len=7)
    return root


def run_both(folder, onnx_dir, rows, cols):
    """The same call through PyTorch (the export wrapper around the loaded model) and the ONNX file."""
    import onnx

    from clear_surgery.surgery import get_clear_state

    model, _ = load_model(str(folder))
    plan = get_clear_state(model).family.export_plan
    inputs = plan.inputs(model, 7, rows, cols, 2, torch.float32, "cpu")
    with torch.no_grad():
        expected = plan.wrap(model).eval()(**inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = reference_session(onnx_dir / "model.onnx")
    names = [i.name for i in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.input]
    got = session.run(None, {name: inputs[name].numpy() for name in names})
    return got, [t.numpy() for t in expected]


@pytest.mark.parametrize("name,config", [
    ("tiny-flux", {}),
    ("tiny-sd3", {"token_layout": "tiled", "tile_shape": [2, 3]}),  # image first, tile order traced
    ("tiny-flux-controlnet", {}),
])
def test_onnx_matches_pytorch_at_two_resolutions_from_one_file(tmp_path, name, config):
    folder = converted(tmp_path, name, **config)
    data = export_model(str(folder), tmp_path / "onnx", "onnx", sizes=SIZES, text_len=7, batch=2)
    assert "model.onnx" in data["files"] and data["inputs"]["hidden_states"]["min"] != data["inputs"]["hidden_states"]["max"]
    for rows, cols in ((3, 4), (5, 2)):  # neither is the size it was traced at (3 x 4 tokens is 48 x 64 px)
        got, want = run_both(folder, tmp_path / "onnx", rows, cols)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(torch.from_numpy(g), torch.from_numpy(w)) < 1e-4


def test_every_clear_site_is_one_node_with_the_plugin_fields(plain_export):
    import onnx

    model = onnx.load(str(plain_export / "onnx" / "model.onnx"), load_external_data=False)
    nodes = clear_nodes(model)
    assert len(nodes) == 4 and all(len(n.input) == 4 and len(n.output) == 1 for n in nodes)
    assert not [n for n in model.graph.node if "attention" in n.op_type.lower() and n.op_type != "ClearAttention"]
    attributes = node_attributes(nodes[0])
    assert attributes["plugin_namespace"] == tensorrt_plugin.PLUGIN_NAMESPACE
    assert nodes[0].op_type == tensorrt_plugin.PLUGIN_NAME and nodes[0].domain == tensorrt_plugin.PLUGIN_NAMESPACE
    assert attributes["radius"] == 2.5 and attributes["text_first"] == 1 and attributes["scale"] == 0.0
    # the plugin's fields are the parameters of its shape function after the tensor inputs, typed as the ONNX
    # parser passes the node's attributes (FLOAT: float32, INT: int32), all from the op schema
    fields = list(inspect.signature(tensorrt_plugin.describe).parameters.values())[len(tensorrt_plugin.TENSOR_INPUTS):]
    types = {np.float32: "FLOAT", np.int32: "INT"}
    plugin_fields = {p.name: types[tensorrt_plugin.FIELDS[p.name]] for p in fields}
    onnx_fields = {name: "FLOAT" if isinstance(value, float) else "INT"
                   for name, value in attributes.items() if name != "plugin_namespace"}
    assert onnx_fields == plugin_fields == ATTRIBUTES


def test_the_aot_step_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    from clear_surgery.plugins.triton_aot import KERNEL_NAME, SCALARS, TENSOR_INPUTS, TENSOR_OUTPUTS

    fields = {"radius": 16.0, "text_first": 1, "tile_h": 8, "tile_w": 8, "scale": 0.0}
    name, ptx, plan, shared = tensorrt_plugin.aot_launch((1, 512 + 256 * 256, 24, 128), (256, 256), "bf16", fields)
    assert name == KERNEL_NAME and f".entry {KERNEL_NAME}(" in ptx and ".target sm_90" in ptx
    assert "wgmma" in ptx  # Hopper tensor-core instructions
    from clear_surgery.plugins.triton_aot import aot_kernel, spec_for

    kernel = aot_kernel(spec_for(128, "bf16", 16.0, True, None, (8, 8)))
    # inputs, scalars, outputs in TensorRT's AOT order; Triton appends two scratch pointers it never reads
    assert kernel.parameters == (".u64",) * len(TENSOR_INPUTS) + (".u32",) * len(SCALARS) + \
        (".u64",) * len(TENSOR_OUTPUTS) + (".u64", ".u64")
    assert kernel.scratch_bytes == 0 and 0 < shared <= 48 * 1024 and kernel.cubin[:4] == b"\x7fELF"
    # grid: (ceil(512 / 64) text blocks + (256 / 8)^2 tiles) per (batch, head); scalars: the sizes
    assert plan.grid == ((8 + 32 * 32) * 24, 1, 1) and plan.scalars == (512 + 65536, 24, 24, 256, 256)
    assert plan.block == (128, 1, 1)


def test_plugin_tactics_cover_bf16_and_fp16():
    combos = tensorrt_plugin.tactics()
    assert [c.types for c in combos] == ["BF16, BF16, BF16, BF16, BF16", "FP16, FP16, FP16, FP16, FP16"]
    assert all(c.tactics == (1, 2, 3) for c in combos)  # TensorRT reserves 0


@pytest.mark.parametrize("args,message", [
    (["builtin:tiny-flux", "--format", "onnx"], "without CLEAR attention: convert it first"),
    (["CONVERTED", "--format", "onnx", "--opt-size", "256x256", "--max-size", "128x128"], "sizes outside the profile"),
    (["CONVERTED", "--format", "onnx", "--min-size", "40x32"], "must be a multiple of 16 pixels"),
    (["CONVERTED", "--format", "onnx", "--dtype", "int8"], "--dtype: unknown dtype 'int8'; choose one of bf16, fp16, fp32"),
    (["CONVERTED", "--format", "tensorrt"], "TensorRT is not installed"),
    (["CONVERTED", "--format", "onnnx"], "--format must be one of onnx, tensorrt, aoti"),
    (["CONVERTED", "--format", "aoti", "--aoti-attention", "inline"],
     "--aoti-attention must be one of embedded, registered, got 'inline'"),
    (["CONVERTED", "--format", "onnx", "--aoti-attention", "registered"],
     "--aoti-attention is an option of --format aoti, not of --format onnx"),
])
def test_bad_exports_fail_with_one_message_and_leave_nothing(tmp_path, args, message):
    if message == "TensorRT is not installed":
        try:
            import tensorrt  # noqa: F401
            pytest.skip("TensorRT is installed here")
        except ImportError:
            pass
    folder = converted(tmp_path, "tiny-flux")
    args = [str(folder) if a == "CONVERTED" else a for a in args]
    result = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert "export:" not in result.output  # refused from the configs, before any progress output or loading
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_aoti_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from clear_surgery.surgery.core.errors import MissingHardwareError

    with pytest.raises(MissingHardwareError, match="needs a CUDA GPU"):
        export_model(str(converted(tmp_path, "tiny-flux")), tmp_path / "out", "aoti", sizes=SIZES)
    assert not (tmp_path / "out").exists()


CPU_PROBE = """
import sys, torch
from clear_surgery.export.aoti import load_package
package = load_package(sys.argv[1])
calls = torch.load(sys.argv[2], weights_only=True)
torch.save([package(**inputs) for inputs in calls], sys.argv[3])
"""


def test_registered_attention_package_runs_on_cpu_in_a_fresh_process(tmp_path):
    """--aoti-attention registered: the package calls clear::attention through torch's dispatcher (here on the CPU,
    where the embedded Triton kernel cannot run); loaded in another process it gives the eager model's output at
    two resolutions, neither the one it was traced at; without clear_surgery imported, torch refuses to load it."""
    import sys

    from clear_surgery.surgery import get_clear_state

    folder = converted(tmp_path, "tiny-flux")
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--format", "aoti",
                                      "--aoti-attention", "registered", "--min-size", "32x32", "--opt-size", "48x64",
                                      "--max-size", "128x128", "--text-len", "7", "--out", str(tmp_path / "aoti")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "aoti" / "manifest.json").read_text())
    assert manifest["attention"] == "registered" and manifest["device"] == "cpu"
    model, _ = load_model(str(folder))
    plan = get_clear_state(model).family.export_plan
    # traced at 48 x 64 px (3 x 4 tokens); run at two other grids of the size range
    calls = [plan.inputs(model, 7, rows, cols, 1, torch.float32, "cpu") for rows, cols in ((5, 2), (8, 5))]
    with torch.no_grad():
        wanted = [plan.wrap(model).eval()(**inputs) for inputs in calls]
    torch.save(calls, tmp_path / "inputs.pt")
    package = str(tmp_path / "aoti" / "model.pt2")
    done = subprocess.run([sys.executable, "-c", CPU_PROBE, package, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for got, want in zip(torch.load(tmp_path / "out.pt", weights_only=True), wanted, strict=True):
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == want.shape and rel_err(got, want) < 1e-4
    bare = subprocess.run([sys.executable, "-c", f"from torch._inductor import aoti_load_package; "
                                                 f"aoti_load_package({package!r})"], capture_output=True, text=True)
    assert bare.returncode != 0 and "clear::attention" in bare.stderr


def test_reference_session_runs_the_node_as_the_reference(tmp_path):
    """The CPU runner itself: the node's output is CLEAR attention on the grid its 'grid' input's shape gives."""
    import onnx
    from onnx import helper

    from clear_surgery.export.onnx import register_schema
    from clear_surgery.plugins import TokenLayout, reference_attention

    register_schema()
    node = helper.make_node("ClearAttention", ["q", "k", "v", "grid"], ["out"], domain="clear", radius=2.0,
                            text_first=0, tile_h=2, tile_w=2, scale=0.0, plugin_namespace="clear")
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [tensor(n, onnx.TensorProto.FLOAT, None) for n in ("q", "k", "v", "grid")],
                              [tensor("out", onnx.TensorProto.FLOAT, None)])
    path = tmp_path / "node.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("clear", 1)]),
              path)
    q, k, v = (np.random.default_rng(i).standard_normal((1, 3 + 20, 2, 8)).astype(np.float32) for i in range(3))
    got = reference_session(path).run(None, {"q": q, "k": k, "v": v, "grid": np.zeros((4, 5), np.float32)})[0]
    want = reference_attention(*(torch.from_numpy(t) for t in (q, k, v)), TokenLayout(3, False, 4, 5, (2, 2)), 2.0)
    assert rel_err(torch.from_numpy(got), want) < 1e-6


AOTI_PROBE = """
import sys, torch
from clear_surgery.export.aoti import load_package
package = load_package(sys.argv[1])  # loaded once: each load of a package costs seconds
calls = torch.load(sys.argv[2], weights_only=True)
torch.save([package(**{k: v.cuda() for k, v in inputs.items()}).cpu() for inputs in calls], sys.argv[3])
"""


@pytest.mark.gpu
def test_gpu_aoti_package_runs_in_a_fresh_process(tmp_path):
    """A tiny converted FLUX as a .pt2: loaded in another process, it gives the eager model's output at two
    resolutions. Inductor fuses the model's casts away (as torch.compile does): at guidance 3.5 eager bf16
    rounds guidance * 1000 to 3504 and the package does not, so there both are held against the float32 eager
    model, the package no further from it than twice the bf16 eager model (or 1e-2); at guidance 4 (4000 is a
    bf16 number) the package is within 1e-2 of the bf16 eager model itself."""
    import subprocess
    import sys

    from clear_surgery.surgery import get_clear_state

    folder = converted(tmp_path, "tiny-flux")
    manifest = export_model(str(folder), tmp_path / "aoti", "aoti", sizes=SIZES, text_len=7, dtype="bf16")
    model, _ = load_model(str(folder), dtype=torch.bfloat16)
    exact, _ = load_model(str(folder), dtype=torch.float32)
    model.cuda(), exact.cuda()
    plan = get_clear_state(model).family.export_plan
    calls, wanted = [], []
    for rows, cols, guidance in ((3, 4, None), (8, 5, None), (8, 5, 4.0)):
        inputs = plan.inputs(model, 7, rows, cols, 1, torch.bfloat16, "cuda")
        if guidance is not None:
            inputs["guidance"] = torch.full_like(inputs["guidance"], guidance)
        with torch.no_grad():
            want = plan.wrap(model)(**inputs).float().cpu()
            truth = plan.wrap(exact)(**{k: v.float() if v.is_floating_point() else v
                                        for k, v in inputs.items()}).cpu()
        calls.append({k: v.cpu() for k, v in inputs.items()})
        wanted.append((f"{rows}x{cols} guidance {guidance or 'default'}", guidance, want, truth))
    torch.save(calls, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", AOTI_PROBE, str(tmp_path / "aoti" / "model.pt2"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (manifest, done.stderr[-3000:])
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    for got, (name, guidance, want, truth) in zip(outputs, wanted, strict=True):
        got = got.float()
        print(f"{name}: package vs float32 {rel_err(got, truth):.2e}, bf16 eager vs float32 "
              f"{rel_err(want, truth):.2e}, package vs bf16 eager {rel_err(got, want):.2e}")
        assert got.shape == want.shape and rel_err(got, truth) < max(2 * rel_err(want, truth), 1e-2)
        if guidance is not None:
            assert rel_err(got, want) < 1e-2


def test_the_package_compiler_matches_the_libstdcxx_torch_runs_on(monkeypatch):
    """The lent GPU image's case: Inductor's default compiler is a separate, newer GCC, torch runs on the
    system's libstdc++ (GCC 14's 6.0.33); both compilers name that library when asked, so their headers'
    release decides. A package must be built with headers no newer than the loaded library."""
    from clear_surgery.export import aoti

    releases = {"/opt/gcc/bin/g++": 15, "/usr/bin/g++": 13}
    monkeypatch.setattr(aoti, "loaded_libstdcxx", lambda: Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33"))
    monkeypatch.setattr(aoti, "headers_release", releases.get)
    monkeypatch.setattr(aoti.shutil, "which", lambda name: {"g++": "/opt/gcc/bin/g++", "/usr/bin/g++": "/usr/bin/g++"}
                        .get(name))
    monkeypatch.delenv("CXX", raising=False)
    assert aoti.choose_compiler("/opt/gcc/bin/g++") == "/usr/bin/g++"
    assert aoti.choose_compiler("/usr/bin/g++") == "/usr/bin/g++"
    releases["/opt/gcc/bin/g++"] = 14  # the library's own release fits
    assert aoti.choose_compiler("/opt/gcc/bin/g++") == "/opt/gcc/bin/g++"
    releases["/opt/gcc/bin/g++"] = 15
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")  # set in the environment (the GPU image does): replaced, said
    with pytest.warns(UserWarning, match="would crash on load; compiling it with /usr/bin/g\\+\\+ instead"):
        assert aoti.choose_compiler("/opt/gcc/bin/g++") == "/usr/bin/g++"
    monkeypatch.delenv("CXX")
    releases["/usr/bin/g++"] = 16  # nothing fits: the default, with a warning
    with pytest.warns(UserWarning, match="set CXX"):
        assert aoti.choose_compiler("/opt/gcc/bin/g++") == "/opt/gcc/bin/g++"


def test_a_compiler_that_links_its_own_libstdcxx_is_not_chosen(tmp_path, monkeypatch):
    """The GPU image's case: Inductor's default compiler put a copy of libstdc++ into the package's library
    (static), whose locale facets crashed on load beside the process's own libstdc++. Seen here with this
    machine's g++ made to link libstdc++ statically: the probe tells it apart, and the choice moves to g++."""
    from clear_surgery.export import aoti

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    static = tmp_path / "static-g++"
    static.write_text(f'#!/bin/sh\nexec {gxx} -static-libstdc++ "$@"\n')
    static.chmod(0o755)
    assert aoti.links_libstdcxx_dynamically(gxx) is True
    assert aoti.links_libstdcxx_dynamically(str(static)) is False
    assert aoti.links_libstdcxx_dynamically(str(tmp_path / "missing-g++")) is None
    assert "its own copy of libstdc++" in aoti.compiler_problem(str(static), None)
    monkeypatch.setenv("CXX", str(static))  # as the GPU image sets CXX to its static-linking GCC
    monkeypatch.setattr(aoti, "OTHER_COMPILERS", (str(static), gxx))
    with pytest.warns(UserWarning, match="its own copy of libstdc"):
        assert aoti.choose_compiler(str(static)) == gxx


def test_the_release_of_a_library_and_of_this_machines_compiler():
    """libstdc++'s file names map to GCC releases (newer ones beyond the table count on); the headers' release
    is read from the compiler itself (this machine's g++ where it has one)."""
    from clear_surgery.export import aoti

    assert aoti.library_release(Path("libstdc++.so.6.0.30")) == 12
    assert aoti.library_release(Path("libstdc++.so.6.0.33")) == 14
    assert aoti.library_release(Path("libstdc++.so.6.0.36")) == 17
    assert aoti.library_release(Path("libc++.so.1")) is None
    assert aoti.headers_release("/nonexistent/g++") is None
    gxx = shutil.which("g++")
    if gxx:
        version = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout.strip()
        assert aoti.headers_release(gxx) == int(version.split(".")[0])


def _variant(tmp_path, variant):
    """A converted folder of each kind a converted model can be."""
    from conftest import coverage_model

    if variant == "masks":  # Chroma: text padding masks at every joint attention
        model, _ = coverage_model("Chroma (ChromaTransformer2DModel)")
        apply_clear(model, ClearConfig(radius=2.5))
        return save_converted(model, tmp_path / "masks-clear", base_model={"id": "tiny-chroma"})
    config = {"plain": {}, "tiled": {"token_layout": "tiled", "tile_shape": [2, 2]}, "down": {"down_factor": 2},
              "per-layer radii": {"radius_overrides": {"single_transformer_blocks.*": 1.5}}}[variant]
    return converted(tmp_path, "tiny-flux", **config)


@pytest.mark.parametrize("variant,refusal", [
    ("plain", None), ("tiled", None), ("per-layer radii", None),
    ("down", "pool_weight: pooled keys (the 'down' variant)"),
    ("masks", "cannot be exported yet"),
])
def test_every_variant_exports_or_is_refused_with_one_line(tmp_path, monkeypatch, capsys, variant, refusal):
    """Several images are a property of a call, not of the converted model: the FLUX export plan serves one
    image, so a FLUX.1 Kontext-style call cannot reach an engine. The command runs in this process (the
    console script itself is tested in test_bad_input.py)."""
    folder = _variant(tmp_path, variant)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stderr = run_in_process(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "onnx"),
                                   "--min-size", "32x32", "--opt-size", "48x64", "--max-size", "128x128"],
                                  tmp_path, monkeypatch, capsys)
    if refusal is None:
        assert code == 0, stderr
        import onnx

        radii = {node_attributes(n)["radius"] for n in clear_nodes(onnx.load(str(tmp_path / "onnx" / "model.onnx"),
                                                                             load_external_data=False))}
        assert radii == ({2.5, 1.5} if variant == "per-layer radii" else {2.5})
        return
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_no_file_of_an_export_holds_a_path_of_the_exporting_machine(plain_export):
    import site
    from pathlib import Path

    import clear_surgery

    machine = {str(plain_export), str(Path.cwd()), str(Path.home()), *site.getsitepackages(),
               *(str(Path(p).resolve().parent) for p in clear_surgery.__path__)}
    machine = {m for m in machine if Path(m).is_absolute() and m != "/"}
    for path in (plain_export / "onnx").iterdir():
        data = path.read_bytes()
        assert not [m for m in machine if m.encode() in data], path.name


def test_an_engine_is_built_only_from_onnx_in_the_kernels_tile_layout(tmp_path, plain_export):
    from clear_surgery.export.tensorrt import ExportLayoutError, check_onnx_for_engine

    with pytest.raises(ExportLayoutError, match="use raster order; a TensorRT engine's kernel needs"):
        check_onnx_for_engine(plain_export / "onnx" / "model.onnx")
    folder = plain_export / "tiny-flux-clear"
    data = export_model(str(folder), tmp_path / "tiled", "onnx", sizes=SIZES, text_len=7, kernel_tile=True)
    check_onnx_for_engine(tmp_path / "tiled" / "model.onnx")
    assert any("token layout: tiled" in note for note in data["notes"])
