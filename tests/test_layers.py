"""The package's layers only point down (docs/architecture.md): every module's imports of our own
modules, read with ``ast`` (those inside functions too), go to its own layer or one below, and
no two modules import each other, directly or around a circle. A test-only probe module that
imports upwards, or a pair that import each other, is caught."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import ROOT

PACKAGE = "sd_lightning"
# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("core",),  # basics: errors, console, config, stop requests, atomic writes
    ("diffusion", "models", "losses"),  # pure maths and networks
    ("data", "weights"),  # data and weight formats
    ("conditioning", "finetune", "evaluation"),  # conditions, fine-tuning, measuring
    ("systems", "callbacks"),  # Lightning
    ("commands",),  # one module per stage=, their checks, opening files
    ("__main__",),  # the command line
]


def layer_of(module: str) -> int:
    """The layer of ``sd_lightning.<part>...`` (the package's own ``__init__``: the lowest)."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def modules(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package under ``root``."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere in it (functions and ``TYPE_CHECKING`` too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the package
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    # `from sd_lightning.x import y` names both the package x and its module y: keep the module
    return {t for t in found if not any(o.startswith(t + ".") for o in found) or t == PACKAGE}


def violations(root: Path) -> list[str]:
    found = modules(root)
    graph = {name: imports(path, name, set(found)) for name, path in found.items()}
    problems = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)}): upwards"
        for name, targets in graph.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    # circles: a depth-first walk of the import graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt]
                problems.append("a circle of imports: " + " -> ".join(circle))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return problems


def test_every_import_points_down_and_none_goes_round():
    assert violations(ROOT) == []


def test_every_module_has_a_layer_and_stays_under_its_size():
    found = modules(ROOT)
    for name in found:
        layer_of(name)  # StopIteration: a folder docs/architecture.md does not place
    sizes = {name: len(path.read_text().splitlines()) for name, path in found.items()}
    assert sizes["sd_lightning.systems.ldm"] <= 350
    assert {n: s for n, s in sizes.items() if s > 400} == {}


def test_a_probe_that_imports_upwards_or_in_a_circle_is_caught(tmp_path):
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("*.pyc"))
    probe = tmp_path / PACKAGE / "models" / "_probe.py"
    probe.write_text("def f():\n    from sd_lightning.commands.train import train\n")
    (tmp_path / PACKAGE / "core" / "_a.py").write_text("from sd_lightning.core import _b\n")
    (tmp_path / PACKAGE / "core" / "_b.py").write_text("import sd_lightning.core._a\n")
    problems = violations(tmp_path)
    assert any(
        "sd_lightning.models._probe (layer 1) imports sd_lightning.commands.train" in p
        for p in problems
    )
    assert any(
        "circle" in p and "sd_lightning.core._a" in p and "sd_lightning.core._b" in p
        for p in problems
    )
    assert len(problems) == 2, problems
