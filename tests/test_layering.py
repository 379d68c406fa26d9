"""The import graph the packages declare in their docstrings: every import (those inside functions included) goes
down the order below, and no module imports itself back through others. The installed packages are imported by
their installed names (``dqrm.quant``, not ``quant``), everywhere: the source folders install under ``dqrm``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which project packages each package may import (besides itself): the order each package's __init__ declares.
# bench and tests are not installed; the other five install as dqrm.<folder>.
ALLOWED = {
    "datasets": set(),
    "sharding": set(),
    "quant": {"sharding"},
    "pipeline": {"datasets", "sharding", "quant"},
    "bench": {"datasets", "sharding", "quant", "pipeline"},
    "torchx_components": set(),
}


def modules() -> dict[str, Path]:
    """Every module of the packages above by dotted name (``quant.api``, ``quant`` for its ``__init__``)."""
    out = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


INSTALLED = {"datasets", "sharding", "quant", "pipeline", "torchx_components"}


def imported_names(path: Path) -> list[str]:
    """Every dotted name ``path`` imports, as written (relative imports resolved), anywhere in its body."""
    this = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's installed package
                package = ["dqrm", *this.split(".")][: -node.level]
                base = ".".join([*package, base] if base else package)
            out += [base, *(f"{base}.{a.name}" for a in node.names)]
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (a ``from P import name`` of a submodule counts as
    importing that submodule), by folder name (``dqrm.quant.api`` is ``quant.api``)."""
    found = set()
    for name in imported_names(path):
        name = name.removeprefix("dqrm.")
        if name.split(".")[0] not in ALLOWED:
            continue
        while name not in known and "." in name:  # quant.api.QuantSpec -> quant.api
            name = name.rsplit(".", 1)[0]
        if name in known:
            found.add(name)
    return found


def test_installed_packages_are_imported_by_their_installed_names():
    """``import quant`` works only inside a checkout (and ``import datasets`` there would be ours, not Hugging
    Face's): the code, its tests and benches import ``dqrm.quant``."""
    bare = [f"{path.relative_to(ROOT)}: {name}" for path in sorted(ROOT.glob("*/**/*.py"))
            if ".venv" not in path.parts for name in imported_names(path) if name.split(".")[0] in INSTALLED]
    assert not bare, "imports of a package by its folder name instead of dqrm.<folder>:\n" + "\n".join(bare)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_packages_import_only_what_they_declare():
    upward = [f"{m} imports {d}" for m, deps in graph().items() for d in sorted(deps)
              if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not upward, "imports against the declared package order:\n" + "\n".join(upward)


def test_declared_order_is_in_each_package_docstring():
    for package, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        line = next((ln for ln in doc.splitlines() if ln.startswith("Imports:")), None)
        assert line is not None, f"{package}/__init__.py: no 'Imports:' line"
        listed = line.removeprefix("Imports:").split("(")[0].split(";")[0]  # what follows is explanation
        named = {w.strip(" .`,") for w in listed.split()} & set(ALLOWED)
        assert named == allowed, f"{package}/__init__.py says {sorted(named)}, the test allows {sorted(allowed)}"


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
