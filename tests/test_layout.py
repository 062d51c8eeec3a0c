"""The package's layout: what ``import skanomaly`` pulls in, and how its modules import
each other (DESIGN.md's "Layers")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import skanomaly

PACKAGE = Path(skanomaly.__file__).parent


def test_import_skanomaly_pulls_in_no_module_of_the_cli():
    """The command line is built on the package, never the other way round."""
    code = ("import json, sys, skanomaly\n"
            "print(json.dumps([m for m in sys.modules if m.startswith('skanomaly.cli')]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that the module ``name`` imports: at module level or in a
    function, absolute or relative, ``from pkg import submodule`` included."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` imports a.b.c; its parent packages are not edges here
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_resolves_relative_and_function_level_imports():
    graph = import_graph()
    assert "skanomaly.base" in graph["skanomaly"]  # from .base import ...
    assert "skanomaly.streaming" in graph["skanomaly.cli.fit"]  # from ..streaming import
    assert "skanomaly.datasets" in graph["skanomaly.cli.run"]  # in a function


def test_the_package_has_no_import_cycle():
    """No module imports one that imports it back, at module level or in a function
    (DESIGN.md's layers: what two modules need lives below both)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def private_imports(name: str, path: Path, source: str | None = None) -> list[str]:
    """``module.name`` of each private name (or name from a private module) that the
    module ``name`` (the file ``path``, or ``source``) imports from the package."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    source = path.read_text() if source is None else source
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != "skanomaly" and not source.startswith("skanomaly."):
                continue  # another package's private names (sklearn's _fit_context...)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if any(part.startswith("_") for part in full.split(".")):
                    found.append(full)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("skanomaly.")
                      and any(part.startswith("_") for part in alias.name.split("."))]
    return found


def test_private_imports_are_found():
    source = ("from .gaussian import GaussianDetector, _helper\n"
              "from ..functional._packing import PackedMatrices\n"
              "from sklearn.base import _fit_context\n"
              "def f():\n    from ..base import _to_numpy, BaseDetector\n")
    path = PACKAGE / "detectors" / "padim.py"
    assert private_imports("skanomaly.detectors.padim", path, source) == [
        "skanomaly.detectors.gaussian._helper",
        "skanomaly.functional._packing.PackedMatrices",
        "skanomaly.base._to_numpy",
    ]


def test_detectors_import_no_private_name_of_another_module():
    """A helper that two detectors need lives in base.py or functional/ under a name
    public to the package; no detector takes a sibling's (or a private module's) private
    name (DESIGN.md's layers)."""
    found = {name: private_imports(name, path) for name, path in _modules().items()
             if name.startswith("skanomaly.detectors")}
    assert {name: names for name, names in found.items() if names} == {}
