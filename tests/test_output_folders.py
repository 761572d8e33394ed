"""Output folders: --overwrite replaces only what clear-surgery wrote; bad output paths are refused before
any work; a writer killed at any moment leaves nothing behind once the next run has started."""

import os
import subprocess
import sys
import textwrap

import pytest

from clear_surgery.hub.atomic import atomic_directory, check_output_folder, recover_interrupted
from conftest import cli_exe, run_in_process

CONVERT = ["convert", "--model", "builtin:tiny-flux", "--radius", "2"]


def run_cli(args, cwd):
    return subprocess.run([cli_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("out,setup,message", [
    ("inner", "precious", "holds files clear-surgery did not write (precious.txt)"),
    (".", None, "is the current folder or holds it"),
    ("..", None, "is the current folder or holds it"),
    ("/proc/x", None, "cannot write in /proc"),
    ("afile", "file", "is a file, not a folder"),
])
def test_bad_outputs_are_refused_before_any_work_and_nothing_is_lost(tmp_path, out, setup, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    if setup == "precious":
        (work / "inner").mkdir()
        (work / "inner" / "precious.txt").write_text("irreplaceable")
    if setup == "file":
        (work / "afile").write_text("a file")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = run_cli([*CONVERT, "--out", out, "--overwrite"], work)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "convert:" not in done.stderr  # refused before any stage started
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if setup == "precious":
        assert (work / "inner" / "precious.txt").read_text() == "irreplaceable"


def test_overwrite_replaces_a_folder_clear_surgery_wrote_or_an_empty_one(tmp_path, monkeypatch, capsys):
    assert run_in_process([*CONVERT, "--out", "out"], tmp_path, monkeypatch, capsys)[0] == 0
    (tmp_path / "empty").mkdir()
    for out in ("out", "empty"):
        code, err = run_in_process([*CONVERT, "--out", out, "--overwrite"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        assert (tmp_path / out / "clear_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no partial or old folder beside


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from clear_surgery.hub import atomic
    out, when = Path(sys.argv[1]), sys.argv[2]
    rename = os.rename
    def killing_rename(src, dst):
        rename(src, dst)
        if when == "between-renames":  # the old folder moved aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.rename = killing_rename
    with atomic.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "clear_config.json").write_text("new")
        if when == "while-writing":
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("when", ["while-writing", "between-renames"])
def test_a_writer_killed_at_any_moment_loses_nothing_and_leaves_nothing(tmp_path, when):
    out = tmp_path / "model"
    out.mkdir()
    (out / "clear_config.json").write_text("old")
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), when], capture_output=True, timeout=120)
    assert done.returncode == -9
    assert len(list(tmp_path.iterdir())) == 2 if when == "while-writing" else not out.exists()  # what it left
    recover_interrupted(out)  # what the next write of this folder does first
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (out / "clear_config.json").read_text() == "old"
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "clear_config.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "clear_config.json").read_text() == "new"


def test_a_folder_being_written_by_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "model"
    partial = tmp_path / f".model.partial-{os.getpid()}-abcd"
    partial.mkdir()
    recover_interrupted(out)
    assert partial.is_dir()
    with pytest.raises(ValueError, match="already exists"):
        check_output_folder(partial, overwrite=False)


def test_a_local_base_is_recorded_relative_to_the_folder_and_travels_with_it(tmp_path, monkeypatch):
    """Layers made from a local model folder find it from any working directory and after both move together;
    a base that cannot be found is reported with where the record came from and --layers-base."""
    import json
    import shutil

    from clear_surgery.hub.clear_layers import resolve_layers
    from clear_surgery.hub.resolve import resolve_model
    from clear_surgery.surgery import ClearConfig, load_builtin
    from clear_surgery.surgery.tools.convert import convert, layers_base_ref

    project = tmp_path / "project"
    load_builtin("tiny-flux").save_pretrained(project / "base")
    convert(resolve_model(str(project / "base")), project / "layers", ClearConfig(radius=2), out_format="layers")
    record = json.loads((project / "layers" / "clear_config.json").read_text())["base_model"]
    assert record["id"] == "../base" and record["relative_to"] == "folder"
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)  # the absolute hint is stale now; the relative path still holds
    monkeypatch.chdir("/")
    assert layers_base_ref(resolve_layers(str(moved / "layers"))).folder == (moved / "base").resolve()
    shutil.rmtree(moved / "base")
    with pytest.raises(ValueError, match=r"records its base model as '\.\./base' relative to .*--layers-base"):
        layers_base_ref(resolve_layers(str(moved / "layers")))


def test_generate_follows_the_same_output_rules(tmp_path, monkeypatch, capsys):
    """Missing parents are created, as for output folders; an existing image is replaced only with --overwrite."""
    args = ["generate", "--model", "builtin:tiny-flux", "--prompt", "a cat", "--height", "32", "--width", "32",
            "--steps", "1", "--out", "new/sub/cat.png"]
    assert run_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0
    assert (tmp_path / "new" / "sub" / "cat.png").is_file()
    code, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and "already exists (pass --overwrite to replace it)" in err
    assert run_in_process([*args, "--overwrite"], tmp_path, monkeypatch, capsys)[0] == 0
