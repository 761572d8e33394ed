"""Every command that takes a model accepts the same forms, through the one resolver: builtin:NAME, a
local model folder, a local pipeline folder, a converted CLEAR folder, a CLEAR-layers folder, and Hub
ids (here from the huggingface_hub cache, offline). Where a form cannot serve a command, the error
is the same one line everywhere."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clear_surgery.hub import load_model
from clear_surgery.surgery import get_clear_state, load_builtin, tiny_pipeline
from clear_surgery.surgery.cli import app
from clear_surgery.surgery.tools.distillation import generate_samples, load_recipe
from conftest import cache_repo

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-flux-r2.toml"
NO_PIPELINE = "with no pipeline around it"
NOT_CLEAR = "push-to-hub uploads a CLEAR folder"


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    return result.exit_code, errors, result.output


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forms")
    tiny_pipeline("builtin:tiny-flux").save_pretrained(tmp / "pipeline")
    load_builtin("tiny-flux").save_pretrained(tmp / "model")
    for out, extra in (("converted", []), ("layers", ["--format", "layers"])):
        code, errors, output = run("convert", "--model", tmp / "pipeline", "--radius", "3", "--out", tmp / out, *extra)
        assert code == 0, output
    cache = tmp / "hf-cache"
    cache_repo(cache, "me/tiny-flux-pipeline", tmp / "pipeline")
    cache_repo(cache, "me/tiny-flux-clear", tmp / "converted")
    recipe = load_recipe(TINY_RECIPE, [f'output.dir="{tmp / "samples-run"}"', f'data.folder="{tmp / "samples"}"',
                                       "data.num_samples=6", "data.holdout=2"])
    generate_samples(recipe, progress=False)
    return dict(tmp=tmp, cache=cache, samples=tmp / "samples", forms={
        "builtin": "builtin:tiny-flux", "model folder": tmp / "model", "pipeline folder": tmp / "pipeline",
        "converted folder": tmp / "converted", "layers folder": tmp / "layers",
        "Hub pipeline id": "me/tiny-flux-pipeline", "Hub CLEAR id": "me/tiny-flux-clear"})


@pytest.fixture(autouse=True)
def hub_cache(forms, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(forms["cache"]))


CLEAR_FORMS = {"converted folder", "layers folder", "Hub CLEAR id"}
FORM_NAMES = ["builtin", "model folder", "pipeline folder", "converted folder", "layers folder", "Hub pipeline id",
              "Hub CLEAR id"]


def _radius(form):
    return [] if form in CLEAR_FORMS else ["--radius", "2"]


@pytest.mark.parametrize("form", FORM_NAMES)
def test_convert(forms, form, tmp_path):
    code, errors, output = run("convert", "--model", forms["forms"][form], "--radius", "2", "--out", tmp_path / "o")
    assert code == 0, output
    model, ref = load_model(str(tmp_path / "o"))
    assert ref.kind == "converted" and get_clear_state(model).config.radius == 2


@pytest.mark.parametrize("form", FORM_NAMES)
def test_generate(forms, form, tmp_path):
    code, errors, output = run("generate", "--model", forms["forms"][form], *_radius(form), "--prompt", "a red robot",
                               "--height", "32", "--width", "32", "--steps", "1", "--out", tmp_path / "g.png")
    if form == "model folder":
        assert code == 2 and len(errors) == 1 and NO_PIPELINE in errors[0], output
    else:
        assert code == 0, output
        assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("form", FORM_NAMES)
def test_profile(forms, form, tmp_path):
    code, errors, output = run("profile", "--model", forms["forms"][form], "--resolution", "32", "--steps", "1",
                               "--radii", "2,4", "--queries", "8", "--out", tmp_path / "p")
    if form == "model folder":
        assert code == 2 and len(errors) == 1 and NO_PIPELINE in errors[0], output
    else:
        assert code == 0, output
        assert (tmp_path / "p" / "locality.json").is_file()


@pytest.mark.parametrize("form", FORM_NAMES)
def test_distill(forms, form, tmp_path):
    code, errors, output = run("distill", "--recipe", TINY_RECIPE, "--model", forms["forms"][form],
                               "--set", f'data.folder="{forms["samples"]}"', "--set", "data.prompts=[]",
                               "--set", "data.holdout=2", "--set", "train.steps=1", "--set", "train.batch_size=2",
                               "--set", "train.eval_every=0", "--set", "train.warmup_steps=0", "--out", tmp_path / "d")
    assert code == 0, output
    model, ref = load_model(str(tmp_path / "d" / "clear-layers"))
    assert ref.kind == "layers" and get_clear_state(model).provenance["teacher"] == str(forms["forms"][form])


@pytest.mark.parametrize("form", FORM_NAMES)
def test_push_to_hub(forms, form):
    code, errors, output = run("push-to-hub", forms["forms"][form], "--repo-id", "me/x", "--dry-run")
    if form in CLEAR_FORMS:
        assert code == 0 and "dry run: nothing uploaded" in output, output
    else:
        assert code == 2 and len(errors) == 1 and NOT_CLEAR in errors[0], output


@pytest.mark.parametrize("command", ["convert", "generate", "profile", "distill", "push-to-hub"])
def test_a_missing_model_is_the_same_error_everywhere(command, tmp_path):
    args = {"convert": ["--radius", "2", "--out", tmp_path / "o"], "generate": ["--prompt", "x"],
            "profile": ["--out", tmp_path / "p"], "distill": ["--recipe", TINY_RECIPE, "--out", tmp_path / "d"],
            "push-to-hub": ["--repo-id", "me/x", "--dry-run"]}[command]
    model = ["./no/such/model"] if command == "push-to-hub" else ["--model", "./no/such/model"]
    code, errors, output = run(command, *model, *args)
    # one error (a recipe lists all its problems under one "error:" line)
    assert code == 2 and len(errors) == 1 and "no such model folder: ./no/such/model" in output, output
