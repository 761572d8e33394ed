"""Distillation: the tiny recipe heals the CLEAR swap, resumes bit-exactly after SIGKILL, trains only
the configured tensors, and refuses bad recipes before doing any work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clear_surgery.surgery import ClearConfig, apply_clear, get_clear_state, load_builtin
from clear_surgery.hub import load_clear_layers
from clear_surgery.surgery.cli import app
from conftest import cli_exe
from clear_surgery.surgery.tools.distillation import Distiller, RecipeError, SampleCache, generate_samples, load_recipe
from clear_surgery.surgery.core.families.flux import FluxSamples
from clear_surgery.surgery.tools.distillation.data import sample_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-flux-r2.toml"
runner = CliRunner()


def tiny(tmp: Path, name: str, *overrides):
    return load_recipe(TINY, [f'output.dir="{tmp / name}"', f'data.folder="{tmp / "data"}"', *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted tiny run, with the model's state before and after."""
    tmp = tmp_path_factory.mktemp("distill")
    recipe = tiny(tmp, "run")
    generate_samples(recipe, progress=False)
    distiller = Distiller(recipe, progress=False)
    before = {k: v.clone() for k, v in distiller.model.state_dict().items()}
    layers = distiller.run()
    after = distiller.model.state_dict()
    return dict(tmp=tmp, recipe=recipe, distiller=distiller, before=before, after=after, layers=layers)


def _velocity(model, sample, generator, sigma):
    batch = {k: v[None] for k, v in sample.items()}
    x0 = batch["latents"]
    noise = torch.randn(x0.shape, generator=generator)
    s = torch.tensor([sigma])
    inputs = FluxSamples.model_inputs(model, batch, (1 - s) * x0 + s * noise, s, 3.5)
    with torch.no_grad():
        return model(**inputs)[0]


def test_tiny_recipe_heals_the_swap(trained):
    """Checked independently of the trainer: fresh models, fresh noise, several noise levels."""
    teacher = load_builtin("builtin:tiny-flux")
    zero_shot = load_builtin("builtin:tiny-flux")
    apply_clear(zero_shot, ClearConfig(radius=2), verify=False)
    healed = load_clear_layers(load_builtin("builtin:tiny-flux"), trained["layers"])
    _, held_out = SampleCache(trained["recipe"].data_folder).split(trained["recipe"].data.holdout)
    errors = {"zero_shot": 0.0, "healed": 0.0}
    for i in range(len(held_out)):
        for sigma in (0.25, 0.5, 0.75):
            want = _velocity(teacher, held_out[i], torch.Generator().manual_seed(100 + i), sigma)
            for name, model in (("zero_shot", zero_shot), ("healed", healed)):
                got = _velocity(model, held_out[i], torch.Generator().manual_seed(100 + i), sigma)
                errors[name] += float(((got - want) ** 2).mean())
    assert errors["healed"] < 0.5 * errors["zero_shot"], errors
    metrics = json.loads((trained["layers"] / "clear_config.json").read_text())["training"]["metrics"]
    assert metrics["eval_student_teacher_mse"] < 0.5 * metrics["zero_shot_student_teacher_mse"]


def test_layers_record_how_they_were_trained(trained):
    """clear_config.json names the recipe (with its hash), the teacher, the steps and the held-out
    metrics; the model card says the same; a healed model saved again keeps the record."""
    import hashlib

    training = json.loads((trained["layers"] / "clear_config.json").read_text())["training"]
    settings = trained["recipe"].to_dict()
    assert training["method"] == "distillation" and training["teacher"] == "builtin:tiny-flux"
    assert training["steps"] == trained["recipe"].train.steps and training["recipe"] == TINY.name
    assert training["recipe_settings"] == json.loads(json.dumps(settings))
    assert training["recipe_sha256"] == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    card = (trained["layers"] / "README.md").read_text()
    assert (f"distilled against the dense teacher `builtin:tiny-flux` for {training['steps']} steps (recipe "
            f"`{TINY.name}`, sha256 `{training['recipe_sha256'][:16]}") in card
    mse = training["metrics"]["eval_student_teacher_mse"]
    assert f"eval_student_teacher_mse = {mse:.4g}" in card and "zero-shot" not in card
    from clear_surgery.hub import save_converted

    healed = load_clear_layers(load_builtin("builtin:tiny-flux"), trained["layers"])
    save_converted(healed, trained["tmp"] / "healed-full")
    assert json.loads((trained["tmp"] / "healed-full" / "clear_config.json").read_text())["training"] == training


def test_only_the_configured_tensors_change(trained):
    names = set(trained["distiller"].trained_names)
    assert names and all(".attn.to_" in n for n in names)
    changed = {n for n in trained["before"] if not torch.equal(trained["before"][n], trained["after"][n])}
    assert changed == names  # every trained tensor moved, nothing else did (bit-identical)
    pristine = load_builtin("builtin:tiny-flux").state_dict()
    assert all(torch.equal(pristine[n], trained["after"][n]) for n in pristine if n not in names)
    saved = load_file(str(trained["layers"] / "clear_layers.safetensors"))
    assert set(saved) == names
    assert all(torch.equal(saved[n], trained["after"][n]) for n in names)


def test_metrics_log_and_checkpoints(trained):
    out = trained["recipe"].output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/student_teacher_mse" in records[0]
    assert records[-1]["step"] == 60 and "eval/student_teacher_mse" in records[-1]
    assert any("train/attention" in r for r in records) and any("train/teacher_output" in r for r in records)
    assert (out / "metrics.png").stat().st_size > 10_000  # the loss curves
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000040", "step-00000060"]  # keep_checkpoints = 2


def test_sigkill_then_resume_is_bit_exact(trained):
    tmp = trained["tmp"]
    out = tmp / "killed"
    args = [cli_exe(), "distill", "--recipe", str(TINY), "--out", str(out), "--set", f'data.folder="{tmp / "data"}"']
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "step-00000020"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "clear-layers").exists()

    refused = runner.invoke(app, args[1:])  # without --resume the earlier run is not silently overwritten
    assert refused.exit_code == 2 and "--resume" in refused.output
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = load_file(str(trained["layers"] / "clear_layers.safetensors"))
    resumed = load_file(str(out / "clear-layers" / "clear_layers.safetensors"))
    assert set(resumed) == set(expected)
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 60


def test_resume_with_changed_learning_rate_is_refused(trained, tmp_path):
    src = trained["recipe"].output_dir / "checkpoints"
    out = tmp_path / "copy"
    shutil.copytree(src, out / "checkpoints")
    result = runner.invoke(app, ["distill", "--recipe", str(TINY), "--out", str(out), "--set",
                                 f'data.folder="{trained["tmp"] / "data"}"', "--set", "train.learning_rate=0.1",
                                 "--set", "train.steps=80", "--resume"])
    assert result.exit_code == 2
    assert "different recipe" in result.output and "train.learning_rate" in result.output


def test_sample_generation_resumes_and_is_deterministic(trained):
    folder = trained["recipe"].data_folder
    path = sample_path(folder, 3)
    original = load_file(str(path))
    path.unlink()
    generate_samples(trained["recipe"], progress=False)
    again = load_file(str(path))  # made alone now, in a batch of 8 before: latents equal up to rounding
    assert set(again) == set(original)
    assert all(torch.equal(again[k], original[k]) for k in original if k != "latents")
    assert torch.allclose(again["latents"], original["latents"], atol=1e-5, rtol=0)
    other = tiny(trained["tmp"], "other", "data.height=32")
    with pytest.raises(RecipeError, match="other settings"):
        generate_samples(other, progress=False)


def test_gradient_checkpointing_gives_the_same_gradients(trained):
    def grads(checkpointing: bool):
        recipe = tiny(trained["tmp"], "gc", f"train.gradient_checkpointing={str(checkpointing).lower()}")
        distiller = Distiller(recipe, progress=False)
        batch = distiller._batch([0, 1], distiller.train_set)
        distiller.losses(batch, distiller._generators(0, [0, 1]))["loss"].backward()
        return {n: p.grad for n, p in distiller.trained.items()}

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.allclose(plain[n], checkpointed[n], rtol=1e-4, atol=1e-7) for n in plain)


def test_bf16_keeps_fp32_master_tensors(trained):
    recipe = tiny(trained["tmp"], "bf16", "train.precision=\"bf16\"", 'model.dtype="bfloat16"', "train.steps=2")
    distiller = Distiller(recipe, progress=False)
    assert all(p.dtype == torch.float32 for p in distiller.trained.values())
    assert all(t.dtype == torch.bfloat16 for t in distiller.teacher_tensors.values())
    frozen = [p for n, p in distiller.model.named_parameters() if n not in distiller.trained]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    values = distiller.step()
    assert torch.isfinite(torch.tensor(values["loss"])) and values["loss"] > 0


@pytest.mark.timeout(300)
def test_ddp_on_two_processes_matches_one(trained, tmp_path):
    """torchrun, gloo on CPU: 2 processes x batch 2 train like 1 process x batch 4 (same samples, same noise)."""
    data = f'data.folder="{trained["tmp"] / "data"}"'
    common = ["--set", data, "--set", "train.steps=4", "--set", "train.checkpoint_every=4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "clear_surgery.surgery.cli", "distill", "--recipe", str(TINY), "--out",
                          str(tmp_path / "ddp"), *common, "--set", "train.batch_size=2"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([cli_exe(), "distill", "--recipe", str(TINY), "--out", str(tmp_path / "one"), *common,
                             "--set", "train.batch_size=4"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "clear-layers" / "clear_layers.safetensors"))
    b = load_file(str(tmp_path / "one" / "clear-layers" / "clear_layers.safetensors"))
    base = load_builtin("builtin:tiny-flux").state_dict()
    for name in a:
        update = (b[name] - base[name]).abs().max()
        assert update > 0
        assert (a[name] - b[name]).abs().max() <= 1e-3 * update + 1e-6, name


@pytest.mark.parametrize("override, message", [
    ("model.tacher=\"x\"", "unknown key model.tacher"),
    ("clear.radius=0", "radius must be > 0"),
    ("data.folder=\"{empty}\"", "holds no cached samples"),
    ("train.optimizer=\"adam8bit\"", "train.optimizer must be one of"),
])
def test_bad_recipe_fails_before_any_work(tmp_path, override, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = ["distill", "--recipe", str(TINY), "--out", str(out), "--set", override.format(empty=tmp_path / "empty")]
    if "data.folder" in override:
        args += ["--set", "data.prompts=[]"]  # the folder is the only data source
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not out.exists()


def test_missing_teacher_is_reported(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY.read_text().replace('teacher = "builtin:tiny-flux"', ""))
    result = runner.invoke(app, ["distill", "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "missing model.teacher" in result.output
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_validate():
    flux = load_recipe(ROOT / "recipes" / "flux-dev-r16.toml")
    assert flux.clear.radius == 16 and flux.data.num_samples == 10_000 and len(flux.prompt_list()) == 1000
    assert (flux.loss.flow_matching, flux.loss.teacher_output, flux.loss.attention) == (1.0, 0.5, 0.5)
    assert flux.train.precision == "bf16" and flux.train.gradient_checkpointing


def test_sd3_teacher_generates_trains_and_saves(tmp_path):
    """The SD3 family path: latents (channels, h, w), timestep = 1000 sigma, image-first attention."""
    recipe = load_recipe(TINY, [f'output.dir="{tmp_path / "run"}"', 'model.teacher="builtin:tiny-sd3"',
                                "train.steps=12", "data.num_samples=12", "data.holdout=4", "data.height=32",
                                "data.width=32", "train.checkpoint_every=6"])
    generate_samples(recipe, progress=False)
    sample = SampleCache(recipe.data_folder)[0]
    assert sample["latents"].shape == (4, 16, 16) and "img_ids" not in sample
    layers = Distiller(recipe, progress=False).run()
    metrics = json.loads((layers / "clear_config.json").read_text())["training"]["metrics"]
    assert metrics["eval_student_teacher_mse"] < metrics["zero_shot_student_teacher_mse"]
    healed = load_clear_layers(load_builtin("builtin:tiny-sd3"), layers)
    assert get_clear_state(healed).config.radius == 2


def test_down_variant_trains_spatial_weight_too(trained, tmp_path):
    """With clear.down_factor the pooled-key weights train with the projections (the dense teacher has none)."""
    recipe = load_recipe(TINY, [f'output.dir="{tmp_path / "run"}"', f'data.folder="{trained["tmp"] / "data"}"',
                                "clear.down_factor=4", "train.steps=6", "train.checkpoint_every=3"])
    layers = Distiller(recipe, progress=False).run()
    tensors = load_file(layers / "clear_layers.safetensors")
    spatial = {n: t for n, t in tensors.items() if n.endswith(".processor.spatial_weight")}
    assert len(spatial) == 4 and all(not torch.allclose(t, torch.full_like(t, 1 / 16)) for t in spatial.values())
    metrics = json.loads((layers / "clear_config.json").read_text())["training"]["metrics"]
    assert metrics["eval_student_teacher_mse"] < metrics["zero_shot_student_teacher_mse"]
    healed = load_clear_layers(load_builtin("builtin:tiny-flux"), layers)
    assert get_clear_state(healed).config.down_factor == 4
    state = healed.state_dict()
    assert all(torch.equal(state[n], t) for n, t in spatial.items())


def test_every_recipe_problem_is_reported_in_one_pass_one_per_line(tmp_path):
    """An unknown key no longer hides the invalid values beside it; each problem is a line of its own."""
    args = ["distill", "--recipe", str(TINY), "--out", str(tmp_path / "out"), "--set", 'model.tacher="x"',
            "--set", "clear.radius=0", "--set", 'train.optimizer="adam8bit"']
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.count("error:") == 1
    lines = [line.strip() for line in result.output.splitlines()]
    for problem in ("unknown key model.tacher", "radius must be > 0", "train.optimizer must be one of"):
        assert sum(problem in line for line in lines) == 1, (problem, result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("after,warned", [(0.160, True), (0.0041, False)])
def test_a_distillation_that_made_the_student_worse_says_so_on_its_card(after, warned):
    from clear_surgery.hub.model_card import describe_training

    lines = describe_training({"method": "distillation", "teacher": "builtin:tiny-flux", "steps": 2,
                               "metrics": {"zero_shot_student_teacher_mse": 0.0134, "eval_student_teacher_mse": after}})
    assert any("made the student worse" in line for line in lines) == warned
