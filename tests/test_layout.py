"""The package's layers, read from its sources: the core imports no tooling, imports form no
cycle, and no module reaches into another tooling module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kanvolution"
CORE_MODULES = {"kanvolution", "kanvolution.layers", "kanvolution.functional", "kanvolution.reference",
                "kanvolution.compat", "kanvolution.export"}
CORE_PACKAGES = ("kanvolution.ops", "kanvolution.bases", "kanvolution._sparse")


def _is_core(name: str) -> bool:
    return name in CORE_MODULES or name.startswith(tuple(p + "." for p in CORE_PACKAGES)) or name in CORE_PACKAGES
# Documented import paths that only re-export names of the subpackages.
REEXPORTS = {f"kanvolution.{name}" for name in ("data", "models", "train", "tune", "bench", "inspection")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` for every import of a kanvolution module, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules:
                edges += [(m, []) for m in submodules]
            elif base in modules:
                edges.append((base, names))
        elif isinstance(node, ast.Import):
            edges += [(a.name, []) for a in node.names if a.name in modules]
    return edges


def _graph() -> dict[str, list[tuple[str, list[str]]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_core_imports_no_tooling():
    for name, edges in _graph().items():
        if _is_core(name):
            outside = {m for m, _ in edges if not _is_core(m) and m != "kanvolution.errors"}
            assert not outside, f"{name} imports {outside}"


def test_tooling_modules_keep_their_private_names():
    for name, edges in _graph().items():
        for module, names in edges:
            if module.startswith(("kanvolution.experiments", "kanvolution.viz")) and module != name:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{name} imports private names of {module}"


def test_tooling_imports_form_no_cycle():
    # The core is a leaf here: its own structure is tested with it.
    graph = {name: {m for m, _ in edges if m != name and not _is_core(m)}
             for name, edges in _graph().items() if name not in REEXPORTS and not _is_core(name)}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt in REEXPORTS or nxt == "kanvolution":
                continue
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert "kanvolution.viz.plots" in graph and "kanvolution.experiments.training" in graph
