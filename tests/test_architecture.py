"""The package's layers (docs/architecture.md): every import points down, never sideways or up.

    cli -> api -> analysis -> {training, runtime} -> io -> {models, data} -> core -> base

``base`` is errors, inputs, files and config (config imports no torch). Within one package
(``core``, ``cli``, ...) modules may import each other, but the whole import graph has no cycle.
Imports inside functions are allowed in ``cli`` only, where they keep ``manidp --help`` fast.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "manidp_cli"
BASE = {"errors", "inputs", "files", "config"}  # one unit: they may import each other
LAYERS = {
    "base": 0,
    "core": 1,
    "models": 2,
    "data": 2,
    "io": 3,
    "training": 4,
    "runtime": 4,
    "analysis": 5,
    "api": 6,
    "cli": 7,
}
ROOT_NAMES_ALLOWED = {"__version__"}  # the only name a module may take from the package root
THIN = {"cli": {"api", "base"}}  # the command line reaches the library through api only


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage or top-level module."""
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else ""
    return "base" if unit in BASE else unit


class _Imports(ast.NodeVisitor):
    """Every ``manidp_cli`` import of a module, with whether it sits inside a function."""

    def __init__(self):
        self.found: list[tuple[str, tuple[str, ...], int, bool]] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.startswith("manidp_cli"):
                self.found.append((alias.name, (), node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        assert node.level == 0, f"relative import at line {node.lineno}: use absolute manidp_cli imports"
        if node.module and node.module.startswith("manidp_cli"):
            self.found.append((node.module, tuple(a.name for a in node.names), node.lineno, self._depth > 0))


def _imports(tree: ast.Module) -> list[tuple[str, tuple[str, ...], int, bool]]:
    visitor = _Imports()
    visitor.visit(tree)
    return visitor.found


def _targets(module: str, names: tuple[str, ...], known: set[str]) -> list[str]:
    """Modules an import statement loads: ``from manidp_cli.cli import train`` loads cli.train."""
    submodules = [f"{module}.{name}" for name in names if f"{module}.{name}" in known]
    return submodules or [module]


def test_every_unit_has_a_layer():
    units = {_unit(name) for name in _modules()} - {"", "__main__"}
    assert units <= set(LAYERS), f"modules outside any layer: {sorted(units - set(LAYERS))}"


def test_imports_point_down_the_layers():
    modules = _modules()
    wrong = []
    for name, tree in modules.items():
        unit = _unit(name)
        if unit in ("", "__main__"):
            continue  # the package root's lazy exports and `python -m manidp_cli`
        for target_module, names, line, _ in _imports(tree):
            for target in _targets(target_module, names, set(modules)):
                target_unit = _unit(target)
                if target_unit == "":
                    if not set(names) <= ROOT_NAMES_ALLOWED:
                        wrong.append(f"{name}:{line} imports {sorted(names)} from the package root")
                elif target_unit != unit and LAYERS[target_unit] >= LAYERS[unit]:
                    wrong.append(
                        f"{name}:{line} ({unit}, layer {LAYERS[unit]}) imports {target} "
                        f"({target_unit}, layer {LAYERS[target_unit]})"
                    )
                elif target_unit != unit and unit in THIN and target_unit not in THIN[unit]:
                    wrong.append(f"{name}:{line} ({unit}) imports {target}; {unit} imports only {sorted(THIN[unit])}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {
        name: {
            t for module, names, _, _ in _imports(tree) for t in _targets(module, names, set(modules)) if t in modules
        }
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_imports_inside_functions_only_in_the_cli():
    hidden = [
        f"{name}:{line} imports {module}"
        for name, tree in _modules().items()
        if _unit(name) not in ("cli", "")
        for module, _, line, nested in _imports(tree)
        if nested
    ]
    assert not hidden, "manidp_cli imports inside functions (move them to the top):\n" + "\n".join(hidden)


@pytest.mark.parametrize(
    "module",
    # the command line too: `manidp --help` and a bad flag must not wait for torch to import
    ["manidp_cli.config", "manidp_cli.errors", "manidp_cli.inputs", "manidp_cli.files", "manidp_cli.cli.main"],
)
def test_base_layer_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"{module} pulls in torch"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: an upward import and a cycle in a made-up module graph are reported."""
    tree = ast.parse("from manidp_cli.api.jobs import run\n\ndef f():\n    from manidp_cli.core import gating\n")
    found = _imports(tree)
    assert [(m, nested) for m, _, _, nested in found] == [("manidp_cli.api.jobs", False), ("manidp_cli.core", True)]
    assert LAYERS[_unit("manidp_cli.api.jobs")] > LAYERS[_unit("manidp_cli.core.flops")]
    assert _targets("manidp_cli.core", ("gating",), {"manidp_cli.core.gating"}) == ["manidp_cli.core.gating"]
