"""The architecture as the imports show it: plugins <- surgery core <- hub <- {export, tools} <- cli.

Every import of the project's own modules is read from the source (ast; imports inside functions
count too); a module may import only its own layer or the layers below, and the module graph has no
cycle.
"""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "clear_surgery"
# layer -> layers it may import (besides itself)
ALLOWED = {
    "plugins": set(),
    "core": {"plugins"},
    "hub": {"core", "plugins"},
    "export": {"hub", "core", "plugins"},
    "tools": {"hub", "core", "plugins"},
    "cli": {"tools", "export", "hub", "core", "plugins"},
}


# package -> its layer: every module belongs to the longest package of this table that contains it (the
# folders show the layers; ``clear_surgery.surgery`` itself only re-exports the core's names)
LAYERS = {
    f"{PACKAGE}.plugins": "plugins",
    f"{PACKAGE}.surgery": "core",
    f"{PACKAGE}.surgery.core": "core",
    f"{PACKAGE}.hub": "hub",
    f"{PACKAGE}.export": "export",
    f"{PACKAGE}.surgery.tools": "tools",
    f"{PACKAGE}.surgery.cli": "cli",
}


def layer_of(module: str) -> str:
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[package]


def project_modules() -> dict[str, Path]:
    """module name -> file, from pyproject's package-dir mapping."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in mapping.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (``from pkg import name`` counts as pkg.name when that
    is a module, else as pkg)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith(PACKAGE + ".") and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, set(modules)) for module, path in modules.items()}


def upward_imports(graph) -> list[str]:
    return sorted(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in graph.items() for b in targets
                  if layer_of(b) != layer_of(a) and layer_of(b) not in ALLOWED[layer_of(a)])


def cycles(graph) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_layer():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(ALLOWED)
    assert len(graph) > 40  # the whole project was read
    # the facade is the only module of clear_surgery.surgery outside the three layer folders
    assert [m for m in graph if m.startswith(f"{PACKAGE}.surgery.") and m.count(".") == 2 and m not in LAYERS] == []


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The two checks themselves, on a graph with one planted fault each."""
    graph = import_graph()
    graph["clear_surgery.surgery.core.rewrite"] = graph["clear_surgery.surgery.core.rewrite"] | {"clear_surgery.hub.converted"}
    assert upward_imports(graph) == ["clear_surgery.surgery.core.rewrite (core) imports clear_surgery.hub.converted (hub)"]
    graph["clear_surgery.surgery.core.processors"] = graph["clear_surgery.surgery.core.processors"] | {
        "clear_surgery.surgery.core.rewrite"}
    assert any("clear_surgery.surgery.core.processors" in c and "clear_surgery.surgery.core.rewrite" in c for c in cycles(graph))
