import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_folder_is_packaged():
    """A non-editable install ships only the listed packages: a new subfolder must be listed."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in tool["package-dir"].items()}
    found = set()
    for folder, name in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([name, *relative]))
    assert found == set(tool["packages"])
