"""The package map of docs/architecture.md, kept true: imports go one way, and no cycle.

Layers (a module may import its own group and the groups of lower rank only):

    0 core      vlaligner (root), the aligner modules, functional, layers, losses, metrics,
                query_diversity, fileio, _validation
    1 data      vlaligner.data.*         1 models   vlaligner.models.*      1 viz
    2 training  vlaligner.training.*     2 predictor (+ export)
    3 cli

Nothing in ``vlaligner`` imports ``adapters``, ``examples`` or ``benchmarks``. Imports under
``if TYPE_CHECKING:`` are annotations only and not counted; the root package's lazy
``Predictor`` attribute is the one allowed upward reference (it is resolved on first use).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlaligner"

RANKS = {"core": 0, "data": 1, "models": 1, "viz": 1, "training": 2, "predictor": 2, "cli": 3}
TOP_LEVEL_GROUPS = {"viz": "viz", "predictor": "predictor", "export": "predictor", "cli": "cli", "batch_segment": "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if parts[1] in ("data", "models", "training"):
        return parts[1]
    return TOP_LEVEL_GROUPS.get(parts[1], "core")


def _type_checking_nodes(tree: ast.AST) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(path: Path, *, module_level_only: bool = False) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [f"{name}.{a.name}" for a in node.names]
            else:
                name, names = node.module or "", []
            for candidate in [name, *names]:
                if candidate.split(".")[0] in ("vlaligner", "adapters", "examples", "benchmarks"):
                    out.add(_existing_module(candidate))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("vlaligner", "adapters", "examples", "benchmarks"):
                    out.add(_existing_module(alias.name))
    out.discard(me)
    return {m for m in out if m}


def _existing_module(name: str) -> str:
    """The longest prefix of ``name`` that is a module or package (``from x import y`` names)."""
    parts = name.split(".")
    while parts:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        if parts[0] != "vlaligner":
            return parts[0]
        parts = parts[:-1]
    return ""


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_direction(path):
    me = module_name(path)
    mine = group_of(me)
    bad = []
    for target in sorted(imports_of(path)):
        if target.split(".")[0] != "vlaligner":
            bad.append(f"{target} (outside the package)")
            continue
        if me == "vlaligner" and target == "vlaligner.predictor":
            continue  # the lazy Predictor attribute of the root package
        theirs = group_of(target)
        if theirs == mine:
            continue
        if RANKS[theirs] >= RANKS[mine]:
            bad.append(f"{target} ({theirs}, rank {RANKS[theirs]})")
    assert not bad, f"{me} ({mine}, rank {RANKS[mine]}) imports against the direction: {bad}"


def test_no_import_cycle_at_module_level():
    graph = {module_name(p): imports_of(p, module_level_only=True) for p in MODULES}

    def is_package(name: str) -> bool:
        return (PACKAGE.parent.joinpath(*name.split(".")) / "__init__.py").is_file()

    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    edges = {m: {t for t in ts if not (is_package(m) and t.startswith(m + "."))} for m, ts in graph.items()}
    state: dict = {}
    path: list = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checker_catches_a_wrong_import(tmp_path):
    # the rules themselves: models importing training, or data importing models, is refused
    assert RANKS[group_of("vlaligner.training.trainer")] > RANKS[group_of("vlaligner.models.eavl")]
    assert group_of("vlaligner.data.refer") == "data" and group_of("vlaligner.models.eavl") == "models"
    assert group_of("vlaligner.aligner") == "core" and group_of("vlaligner.cli") == "cli"
