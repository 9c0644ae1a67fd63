"""The house's shape, checked on its source: imports run downhill only, no two modules
import each other (even lazily), and no function grows past 80 lines.

The floors, lowest first (README, "Architecture"): the top-level helpers (errors, cpus,
progress, distributed, _compat), then data, models, inference, evaluation, spatial, then
training and serve, then cli. A module imports its own folder and the floors below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import idcscope

PACKAGE = Path(idcscope.__file__).parent
FLOORS = {
    "data": 1, "models": 2, "inference": 3, "evaluation": 4, "spatial": 5,
    "training": 6, "serve": 6, "cli": 7,
}  # fmt: skip
LONGEST = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """The idcscope modules ``name`` imports, at its top or inside a function."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = "", [a.name for a in node.names]
        else:
            continue
        for candidate in [*names, target]:
            if candidate.startswith("idcscope"):
                found.add(candidate)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, (path, tree) in modules.items():
        deps = set()
        for target in _imports(name, path, tree):
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _folder(module: str) -> str:
    """``data`` of ``idcscope.data.grid``; the top-level helpers and the entry point are
    their own (``errors``, ``__main__``)."""
    return module.split(".")[1] if "." in module else ""


def _floor(module: str) -> int:
    if _folder(module) == "__main__":  # the console entry point: above everything
        return max(FLOORS.values()) + 1
    return FLOORS.get(_folder(module), 0)


def test_imports_run_downhill():
    wrong = [
        f"{a} -> {b}"
        for a, deps in _graph().items()
        for b in deps
        if _floor(b) > _floor(a)  # up a floor
        or (_floor(a) == _floor(b) > 0 and _folder(a) != _folder(b))  # across (training, serve)
    ]
    assert wrong == []


def test_no_two_modules_import_each_other():
    graph = _graph()
    cycles = []
    for start in graph:  # a path back to ``start``: a cycle through it
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                cycles.append(start)
                break
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
    assert cycles == []


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})"
        for path, tree in _modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > LONGEST
    ]
    assert long == []
