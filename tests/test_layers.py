"""The house's layers (README, *Architecture*), one folder of src/mist each: faces over the job runner over the engine
over models and devices over files, images and names. A module may import from its own layer and the layers below
it, never from one above; and no chain of imports, function-level ones included, comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Highest first: each layer is a folder of src/mist (the package itself, the Python API, is a face; its version
# is the base's). A module belongs to the layer of the longest prefix listed for it.
LAYERS: dict[str, tuple[str, ...]] = {
    "faces": ("mist", "mist.faces"),
    "runner": ("mist.runner",),
    "engine": ("mist.engine",),
    "models": ("mist.models",),
    "base": ("mist.common", "mist.version"),
}
RANK = {name: rank for rank, name in enumerate(reversed(LAYERS))}  # base 0 ... faces 4


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "mist").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The Mist modules `name` imports anywhere in its file (top level, in functions, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known] or [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer(name: str) -> str:
    matches = [(len(prefix), layer_name) for layer_name, prefixes in LAYERS.items() for prefix in prefixes
               if name == prefix or ("." in prefix and name.startswith(prefix + "."))]  # "mist": itself alone
    assert matches, f"{name}: in no layer of tests/test_layers.py (add it where it belongs)"
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer(name)


def test_no_module_imports_from_a_layer_above_its_own(graph):
    upward = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
              for name, targets in sorted(graph.items()) for target in sorted(targets)
              if RANK[layer(target)] > RANK[layer(name)]]
    assert upward == []


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk finds function-level and relative imports, so the test above can fail."""
    module = tmp_path / "mist" / "common" / "images.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..faces.cli import main\n    from ..runner import jobs\n")
    known = {"mist.common.images": module, "mist.faces.cli": module, "mist.runner.jobs": module, "mist": module}
    assert imports("mist.common.images", module, known) == {"mist.faces.cli", "mist.runner.jobs"}
    assert RANK[layer("mist.faces.cli")] > RANK[layer("mist.common.images")]


def test_a_module_outside_the_layers_folders_has_no_layer():
    """A new module at the top of the package (beside version.py) must be placed in a layer's folder."""
    with pytest.raises(AssertionError, match="in no layer"):
        layer("mist.helpers")
