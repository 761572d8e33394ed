"""Distillation with a ControlNet in the loop, on the 64x64 testbed (its dev and its ControlNet): the teacher is
dense dev + ControlNet, the student CLEAR dev + the same ControlNet, so the layers heal on the activations a
ControlNet user produces. A few steps each; the ControlNet must reach both sides, a ControlNet that does not fit
is refused before any work, and a stopped run resumes bit-exactly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clear_surgery.surgery.cli import app
from clear_surgery.surgery.tools.distillation import Distiller, generate_samples, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "testbed" / "distill-r8-controlnet.toml"
SMALL = ["data.num_samples=6", "data.holdout=2", "data.inference_steps=2", "data.generate_batch_size=3",
         "train.steps=4", "train.batch_size=2", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1"]
runner = CliRunner()


def recipe(tmp: Path, name: str, *overrides):
    return load_recipe(RECIPE, [*SMALL, f'output.dir="{tmp / name}"', f'data.folder="{tmp / "data"}"',
                                f'model.teacher="{ROOT / "recipes/testbed/models/dev"}"',
                                f'model.controlnet="{ROOT / "recipes/testbed/models/controlnet"}"', *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill-controlnet")
    r = recipe(tmp, "run")
    generate_samples(r, progress=False)
    distiller = Distiller(r, progress=False)
    return dict(tmp=tmp, recipe=r, distiller=distiller, layers=distiller.run())


def test_the_controlnet_drives_teacher_and_student(run):
    distiller = run["distiller"]
    batch = distiller._batch([0], distiller.train_set)
    assert batch["controlnet_cond"].shape == batch["latents"].shape  # the condition's packed latents, as made
    inputs, _ = distiller._noised(batch, distiller._generators(0, [0]))
    controlled, student = distiller._controlled(inputs, batch)
    assert {"controlnet_block_samples", "controlnet_single_block_samples"} <= set(controlled)
    assert student is controlled  # the ControlNet's attention is dense on both sides: its residuals made once
    teacher, _ = distiller._teacher(controlled)
    with torch.no_grad():
        plain = torch.func.functional_call(distiller.model, distiller.teacher_tensors, (), inputs, strict=False)[0]
    # the ControlNet changes what the (dense) teacher predicts, so the layers heal on its activations
    assert (teacher - plain).norm() / plain.norm() > 1e-3
    config = json.loads((run["layers"] / "clear_config.json").read_text())
    assert config["training"]["controlnet"] == {"model": str(ROOT / "recipes/testbed/models/controlnet"),
                                                "attention": "dense", "share_of_batches": 1.0,
                                                "condition": "gray", "scale": 1.0}
    # the layers hold dev's attention tensors only: they apply to dev with or without the ControlNet
    assert all(not name.startswith("controlnet") for name in load_file(str(run["layers"] / "clear_layers.safetensors")))


def test_a_zero_shot_clear_controlnet_differs_from_the_dense_teacher_side(run, tmp_path):
    r = recipe(tmp_path, "clear", 'model.controlnet_attention="clear"', f'data.folder="{run["tmp"] / "data"}"')
    distiller = Distiller(r, progress=False)
    batch = distiller._batch([0], distiller.train_set)
    inputs, _ = distiller._noised(batch, distiller._generators(0, [0]))
    dense, clear = (side["controlnet_block_samples"][0] for side in distiller._controlled(inputs, batch))
    assert (dense - clear).norm() / dense.norm() > 1e-4  # r = 8 on a 16 x 16 grid still masks


def test_a_controlnet_that_does_not_fit_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["distill", "--recipe", str(RECIPE), "--out", str(out),
                                 "--model", str(ROOT / "recipes/testbed/models/dev"),
                                 "--controlnet", "builtin:tiny-flux-controlnet", *sum((["--set", s] for s in SMALL), [])])
    assert result.exit_code == 2, result.output
    assert "does not fit" in result.output and "hidden size" in result.output
    assert not (out / "clear-layers").exists() and not list(out.glob("data/sample-*"))


def test_a_recipe_with_a_controlnet_needs_its_control_images(tmp_path):
    text = RECIPE.read_text().replace('control_images = "conditions"', "")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
    (tmp_path / "r.toml").write_text(text)
    result = runner.invoke(app, ["distill", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.controlnet needs data.control_images" in result.output
    result = runner.invoke(app, ["distill", "--recipe", str(RECIPE), "--out", str(tmp_path / "o"),
                                 "--set", "data.control_images=false", "--set", 'data.condition="depth"'])
    assert result.exit_code == 2 and "data.control_images must name a folder" in result.output
    assert "data.condition must be one of ['gray', 'edges']" in result.output  # every problem in one error


def test_a_share_of_batches_heals_without_the_controlnet(run, tmp_path, monkeypatch):
    """model.controlnet_share = 0.5 alternates: every other step heals on the model alone (no residuals, teacher
    and student alike), so one run heals for both relatives."""
    r = recipe(tmp_path, "half", "model.controlnet_share=0.5", f'data.folder="{run["tmp"] / "data"}"')
    distiller = Distiller(r, progress=False)
    seen = []
    controlled = Distiller._controlled

    def record(self, inputs, batch):
        teacher, student = controlled(self, inputs, batch)
        seen.append((self.state.step, "controlnet_block_samples" in teacher, "controlnet_block_samples" in student))
        return teacher, student

    monkeypatch.setattr(Distiller, "_controlled", record)
    distiller.step()
    distiller.step()
    assert seen == [(0, False, False), (1, True, True)]
    bad = runner.invoke(app, ["distill", "--recipe", str(RECIPE), "--out", str(tmp_path / "o"),
                              "--set", "model.controlnet_share=0"])
    assert bad.exit_code == 2 and "model.controlnet_share must be in (0, 1]" in bad.output


@pytest.fixture(scope="module")
def trained_run(run):
    """The same run with the ControlNet's attention CLEAR and trained beside the model's."""
    r = recipe(run["tmp"], "trained", 'model.controlnet_attention="trained"')
    distiller = Distiller(r, progress=False)
    return dict(recipe=r, distiller=distiller, layers=distiller.run())


def test_a_trained_controlnet_heals_its_own_attention(run, trained_run):
    from clear_surgery.surgery.tools.controlnets import load_controlnet

    distiller, out = trained_run["distiller"], trained_run["layers"].parent
    own = load_file(str(out / "clear-layers-controlnet" / "clear_layers.safetensors"))
    original = load_controlnet(str(ROOT / "recipes/testbed/models/controlnet"), distiller.model).state_dict()
    assert own and all(name in original for name in own)  # its attention tensors, under its own names
    changed = [n for n in own if not torch.equal(own[n], original[n].to(own[n].dtype))]
    assert len(changed) == len(own), "every trained ControlNet tensor moved"
    config = json.loads((out / "clear-layers-controlnet" / "clear_config.json").read_text())
    assert config["model_class"] == "FluxControlNetModel" and config["config"]["radius"] == 8
    assert config["training"]["controlnet"]["attention"] == "trained"
    # the dense side runs the ControlNet as it was: its residuals equal an untouched ControlNet's
    batch = distiller._batch([0], distiller.train_set)
    inputs, _ = distiller._noised(batch, distiller._generators(0, [0]))
    teacher, student = distiller._controlled(inputs, batch)
    fresh = load_controlnet(str(ROOT / "recipes/testbed/models/controlnet"), distiller.model)
    with torch.no_grad():
        expected = distiller.family.controlnet_residuals(fresh, inputs, batch, 1.0)
    torch.testing.assert_close(teacher["controlnet_block_samples"][0], expected["controlnet_block_samples"][0])
    assert (student["controlnet_block_samples"][0] - expected["controlnet_block_samples"][0]).norm() > 0
    # the model's layers differ from those healed beside a frozen ControlNet: the gradient reached both
    mine = load_file(str(trained_run["layers"] / "clear_layers.safetensors"))
    frozen = load_file(str(run["layers"] / "clear_layers.safetensors"))
    assert set(mine) == set(frozen) and not all(torch.equal(mine[n], frozen[n]) for n in mine)


@pytest.mark.parametrize("attention", ["dense", "trained"])
def test_a_stopped_run_resumes_bit_exactly(run, trained_run, attention, tmp_path, monkeypatch):
    r = recipe(tmp_path, "stopped", f'data.folder="{run["tmp"] / "data"}"', f'model.controlnet_attention="{attention}"')
    distiller = Distiller(r, progress=False)
    step = Distiller.step

    def stop_after_two(self):
        if self.state.step == 2:  # the checkpoint of step 2 is written: stop as a kill would
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Distiller, "step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        distiller.run()
    monkeypatch.setattr(Distiller, "step", step)
    resumed = Distiller(r, progress=False).run(resume=True)
    whole = {"dense": run, "trained": trained_run}[attention]["layers"]
    folders = ["clear-layers"] + (["clear-layers-controlnet"] if attention == "trained" else [])
    for folder in folders:
        expected = load_file(str(whole.parent / folder / "clear_layers.safetensors"))
        got = load_file(str(resumed.parent / folder / "clear_layers.safetensors"))
        assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in expected), folder


def test_check_transfer_runs_the_controlnet_with_its_own_layers(trained_run, tmp_path):
    from clear_surgery.surgery.cli import main

    out = trained_run["layers"].parent
    common = ["check-transfer", "--target", str(ROOT / "recipes/testbed/models/dev"), "--prompts",
              str(ROOT / "recipes/testbed/prompts.txt"), "--num-images", "1", "--steps", "2", "--height", "64",
              "--width", "64", "--controlnet", str(ROOT / "recipes/testbed/models/controlnet"), "--control-images",
              str(ROOT / "recipes/testbed/conditions"), "--clear-layers", str(out / "clear-layers")]
    assert main([*common, "--controlnet-layers", str(out / "clear-layers-controlnet"), "-o", str(tmp_path / "a")]) == 0
    setup = json.loads((tmp_path / "a" / "metrics.json").read_text())["setup"]
    assert setup["controlnet_attention"] == "trained" and setup["controlnet_layers"].endswith("clear-layers-controlnet")
    # the model's layers named as the ControlNet's: refused before any image, nothing written
    result = runner.invoke(app, [*common, "--controlnet-layers", str(out / "clear-layers"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "do not fit the ControlNet's FluxControlNetModel" in result.output, result.output
    assert not (tmp_path / "b").exists()
    result = runner.invoke(app, [*common, "--controlnet-attention", "dense", "--controlnet-layers",
                                 str(out / "clear-layers-controlnet"), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and "go together" in result.output, result.output


@pytest.mark.timeout(300)
def test_a_trained_controlnet_under_ddp_matches_one_process(run, tmp_path):
    """torchrun, gloo on CPU: the ControlNet is not inside DDP, so its gradients are averaged by hand; 2 processes
    x batch 1 train both layer sets like 1 process x batch 2."""
    import os
    import subprocess
    import sys

    sets = [*sum((["--set", s] for s in SMALL), []), "--set", f'data.folder="{run["tmp"] / "data"}"',
            "--set", f'model.teacher="{ROOT / "recipes/testbed/models/dev"}"',
            "--set", f'model.controlnet="{ROOT / "recipes/testbed/models/controlnet"}"',
            "--controlnet-attention", "trained", "--set", "train.eval_every=0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for name, launch, batch in (("ddp", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"], 1),
                                ("one", ["-m"], 2)):
        done = subprocess.run([sys.executable, *launch, "clear_surgery.surgery.cli", "distill", "--recipe", str(RECIPE),
                               "--out", str(tmp_path / name), *sets, "--set", f"train.batch_size={batch}"],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    from clear_surgery.hub import load_model

    for folder, base in (("clear-layers", "dev"), ("clear-layers-controlnet", "controlnet")):
        original = load_model(str(ROOT / "recipes/testbed/models" / base))[0].state_dict()
        a, b = (load_file(str(tmp_path / name / folder / "clear_layers.safetensors")) for name in ("ddp", "one"))
        assert set(a) == set(b)
        for name in a:
            update = (b[name] - original[name]).abs().max()  # what training moved, against the two runs' difference
            assert update > 0 and (a[name] - b[name]).abs().max() <= 1e-3 * update + 1e-6, (folder, name)
