"""The layers import only downward, and no import cycle exists (read with ``ast``).

The pipeline is config -> scenario/data -> backbone -> learner -> evaluator -> results; a
module may import modules of its own or a lower rank, never a higher one, and the module
import graph has no cycle. A registered method's module never imports another registered
method's module (shared machinery lives in its own modules). The facade ``ptcl/__init__``
(which imports the built-ins so the registries are full) and ``__main__`` are above all.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "ptcl"

RANKS: dict[str, int] = {
    # foundation: no ptcl imports but these
    "ptcl._version": 0, "ptcl.errors": 0, "ptcl.seeding": 0, "ptcl.metrics": 0,
    "ptcl.registry": 1, "ptcl.io": 1, "ptcl.dist": 1, "ptcl.precision": 1,
    "ptcl.paths": 2,
    "ptcl.options": 2,
    "ptcl.config": 3, "ptcl.report": 3, "ptcl.pilot": 3,
    "ptcl.backbones": 4, "ptcl.heads": 4,
    "ptcl.peft": 5, "ptcl.data": 5,
    "ptcl.train": 6,
    "ptcl.experts": 7,
    "ptcl.methods": 8,
    "ptcl.engine": 9,
    "ptcl.cli": 10,
}
TOP = {"ptcl", "ptcl.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def rank(module: str) -> int:
    if module in TOP:
        return 99
    best = max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer in tests/test_layers.py RANKS; add it"
    return RANKS[best]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported ptcl module, line)`` for every import in the file (functions included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "ptcl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "ptcl":
                continue
            for a in node.names:  # ``from ptcl.x import y``: y may be a submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in modules else mod, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_import_points_down():
    bad = []
    for name, deps in graph().items():
        for dep, line in deps:
            if rank(dep) > rank(name):
                bad.append(f"{name} (line {line}) imports {dep}, a higher layer "
                           f"({rank(name)} < {rank(dep)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = {k: sorted({d for d, _ in v if d != k}) for k, v in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in g.get(n, []):
            if d in TOP or d not in g:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and n not in TOP:
            cycle = visit(n)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def registered_method_modules() -> set[str]:
    return {name for name, path in all_modules().items()
            if name.startswith("ptcl.methods.") and "METHODS.register" in path.read_text()}


EXTENDS = {"ptcl.methods.cofima": {"ptcl.methods.slca"}}
"""Methods that are another method plus a step, and subclass it (named in their docstring):
CoFiMA is SLCA's training, statistics and alignment per task plus a Fisher-weighted merge.
Any other import between method modules is a shared part that belongs in its own module."""


def test_methods_do_not_import_each_other():
    methods = registered_method_modules()
    assert len(methods) >= 10
    bad = [f"{name} (line {line}) imports the method module {dep}; move the shared part to its own module"
           for name, deps in graph().items() if name in methods
           for dep, line in deps if dep in methods and dep != name and dep not in EXTENDS.get(name, ())]
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an engine import in a data module is reported."""
    fake = tmp_path / "mod.py"
    fake.write_text("from ptcl.engine.runner import run\nimport ptcl.methods.base\n")
    deps = imports_of("ptcl.data.fake", fake, all_modules())
    assert [d for d, _ in deps] == ["ptcl.engine.runner", "ptcl.methods.base"]
    assert all(rank(d) > rank("ptcl.data.fake") for d, _ in deps)
