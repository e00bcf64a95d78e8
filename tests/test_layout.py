"""The package layout stays as docs/contributing.md describes it: import layers, no import cycle, a short top level.

Everything here reads the source with ``ast`` (nothing is imported), so an import inside a function counts as
much as one at the top of a module: a lazy import hides a dependency from the import system, not from the design.
Imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgefuse"

# The import layers, lowest first (docs/contributing.md, "Import layers").
# progress: the tqdm bar / 30 s heartbeat of long work, used by fusion and finetune alike
SHARED = {"errors", "io_utils", "models", "metrics", "ort", "manifest", "names", "lazy", "records", "progress"}
STAGES = {"fusion", "ntk", "finetune", "export", "optimize", "quantize", "tune", "profile", "report"}
ORCHESTRATION = {"pipeline", "check"}  # `check` runs the pipeline, then judges its results against budgets
# A fused folder is a model format: loading one rebuilds its per-MLP widths and frozen scales, which only the
# fusion stage knows how to do. This is the one import from a shared module into a stage package.
SHARED_EXCEPTIONS = {("edgefuse.models", "edgefuse.fusion.persist")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _lazy_table(package: str) -> dict[str, str]:
    """A package's ``_LAZY`` table (public name -> defining module), so ``from pkg import name`` resolves."""
    path = MODULES.get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(getattr(t, "id", None) == "_LAZY" for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    return {}


def _imported(name: str, path: Path) -> set[str]:
    """The edgefuse modules that ``name`` imports anywhere in its source, resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(module: str, names: list[str]) -> None:
        for n in names:
            sub = f"{module}.{n}"
            found.add(sub if sub in MODULES else _lazy_table(module).get(n, module))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "edgefuse")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.split(".")[0] == "edgefuse":
                    resolve(module, [a.name for a in child.names])
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


GRAPH: dict[str, set[str]] = {name: _imported(name, path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    """``edgefuse.fusion.api`` -> ``fusion``; ``edgefuse`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_graph_resolves_every_edgefuse_import() -> None:
    unknown = sorted({f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if t not in MODULES})
    assert not unknown, unknown
    # the walk sees real edges: the pipeline calls every stage
    assert {"edgefuse.fusion.api", "edgefuse.export.api"} <= GRAPH["edgefuse.pipeline.model_stages"] | GRAPH[
        "edgefuse.pipeline.graph_stages"
    ] | GRAPH["edgefuse.pipeline.context"]


def test_top_level_is_the_stage_packages_and_a_few_shared_modules() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert packages == STAGES | ORCHESTRATION | {"config", "cli"}, packages
    assert modules == SHARED, f"new top-level module(s) {sorted(modules - SHARED)}: put them in a stage package"
    assert len(modules) <= 12


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_package_says_what_it_takes_and_gives(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"edgefuse/{package}/__init__.py needs a docstring"


def test_shared_modules_import_no_stage_package() -> None:
    bad = [
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if _top(m) in SHARED
        for t in ts
        # the root package only holds __version__ and lazy names: importing it loads no stage
        if _top(t) not in SHARED and t != "edgefuse" and (m, t) not in SHARED_EXCEPTIONS
    ]
    assert not bad, bad
    for m, t in SHARED_EXCEPTIONS:  # an exception that no longer exists must leave this list
        assert t in GRAPH[m], f"{m} no longer imports {t}: remove it from SHARED_EXCEPTIONS"


def test_stage_packages_import_neither_cli_nor_orchestration() -> None:
    bad = [
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if _top(m) in STAGES | {"config"} | SHARED
        for t in ts
        if _top(t) in ORCHESTRATION | {"cli"}
    ]
    assert not bad, bad
    # only the CLI (and the package's `python -m` entry) imports the CLI
    users = sorted(m for m, ts in GRAPH.items() if any(_top(t) == "cli" for t in ts) and _top(m) != "cli")
    assert users == ["edgefuse.__main__"], users


def test_config_imports_only_shared_modules() -> None:
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if _top(m) == "config" for t in ts
           if _top(t) not in SHARED | {"config"}]
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []
