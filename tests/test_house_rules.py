"""House rules of the code base (issue 21), checked on the source itself.

1. The library never imports the pipeline: nothing in sunfish/ imports ``pipeline``.
2. The models stand alone: sunfish/models/* import nothing from sunfish.training, sunfish.tracking,
   sunfish.report or sunfish.evaluation.
3. No import circles among the modules of sunfish/ (nor among those of sunfish/ and pipeline/).
4. ``import sunfish.cli`` and ``import sunfish.config`` do not load torch (``sunfish --help`` and
   params validation answer at once).
5. No module in sunfish/ is over 600 lines.

How imports are read (rules 1-3): every ``import`` and ``from ... import`` statement in a module's
AST counts, at the top of the module *and* inside functions and methods, because a lazy import that
closes a circle is still a circle (it only moves the failure to the moment the function first runs,
and it hides which module depends on which). The one exception is a block under ``if
TYPE_CHECKING:``, which never runs. ``from a.b import c`` is an edge to ``a.b.c`` when that is a
module of the project, else to ``a.b``; relative imports are resolved against the importing module.
Importing ``a.b.c`` also runs ``a/b/__init__.py``, but that implicit edge is not added: a package
whose ``__init__`` re-exports its submodules would otherwise always count as a circle. A submodule
that imports from its own package's ``__init__`` (``from sunfish.tracking import x`` inside
sunfish/tracking/store.py while ``__init__`` imports store) is a real circle and is reported.

Each rule has a test feeding the scanner a made-up case that breaks it, so none can pass vacuously.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
MODELS_MAY_NOT_IMPORT = ("sunfish.training", "sunfish.tracking", "sunfish.report", "sunfish.evaluation")


# ------------------------------------------------------------------------------------------------
# the scanner


def module_name(path: Path, root: Path = ROOT) -> str:
    """``sunfish/tracking/store.py`` -> ``sunfish.tracking.store``; ``__init__.py`` names its package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT, packages: Iterable[str] = ("sunfish", "pipeline")) -> dict[str, Path]:
    """Every module of the given top-level packages: {dotted name: file}."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(source: str, name: str, is_package: bool, known: Iterable[str] = ()) -> set[str]:
    """Dotted names a module imports (any depth but TYPE_CHECKING blocks), resolved as described above.

    ``name`` is the importing module (to resolve relative imports), ``known`` the project's modules
    (so that ``from pkg import sub`` names the submodule ``pkg.sub``).
    """
    known = set(known)
    out: set[str] = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if sub in known else target)
    return out


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """{module: imported modules}, all imports (project and outside) kept."""
    graph = {}
    for name, path in modules.items():
        graph[name] = imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules)
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_imports(graph: Mapping[str, set[str]], importers: str, targets: Iterable[str]) -> list[str]:
    """``importer -> target`` for every module under ``importers`` that imports anything under ``targets``."""
    targets = tuple(targets)
    return sorted(f"{m} -> {t}" for m, imported in graph.items() if _within(m, importers)
                  for t in imported if any(_within(t, x) for x in targets))


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles among the graph's own modules: each strongly connected component of more than
    one module (or a module importing itself), as a sorted list; Tarjan's algorithm, iterative."""
    nodes = sorted(graph)
    edges = {n: sorted(t for t in graph[n] if t in graph) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cycles.append(sorted(component))
    return sorted(cycles)


def long_modules(modules: Mapping[str, Path], limit: int = MAX_LINES) -> dict[str, int]:
    counts = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    return {name: n for name, n in sorted(counts.items()) if n > limit}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(project_modules())


# ------------------------------------------------------------------------------------------------
# the rules, on the real code


def test_the_scanner_sees_the_project(graph):
    assert {"sunfish.cli", "sunfish.config", "pipeline.common", "sunfish.models"} <= set(graph)
    assert "sunfish.config" in graph["pipeline.common"]  # a top-level import
    assert "sunfish.tracking" in graph["pipeline.common"]  # ... and one inside a method


def test_the_library_never_imports_the_pipeline(graph):
    assert forbidden_imports(graph, "sunfish", ["pipeline"]) == []


def test_the_models_import_no_training_tracking_report_or_evaluation(graph):
    assert forbidden_imports(graph, "sunfish.models", MODELS_MAY_NOT_IMPORT) == []


def test_no_import_cycles_in_the_library(graph):
    library = {m: t for m, t in graph.items() if _within(m, "sunfish")}
    assert import_cycles(library) == []


def test_no_import_cycles_in_the_pipeline_either(graph):
    assert import_cycles(graph) == []


@pytest.mark.parametrize("module", ["sunfish.cli", "sunfish.config"])
def test_importing_does_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", f"import {module} loaded torch"


def test_no_library_module_over_600_lines():
    library = project_modules(packages=("sunfish",))
    assert long_modules(library) == {}


# ------------------------------------------------------------------------------------------------
# each rule can fail: the scanner on made-up code


KNOWN = {"sunfish", "sunfish.a", "sunfish.b", "sunfish.pkg", "sunfish.pkg.sub", "sunfish.models",
         "sunfish.models.x", "sunfish.training", "sunfish.training.loop"}


def test_imports_at_any_depth_count_but_type_checking_blocks_do_not():
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from sunfish import a\n"
        "if TYPE_CHECKING:\n"
        "    from sunfish.training import loop\n"
        "else:\n"
        "    import sunfish.b\n"
        "def f():\n"
        "    from pipeline.common import setup_logging\n"
        "class C:\n"
        "    def m(self):\n"
        "        from .pkg import sub\n"
        "        from . import a as again\n"
    )
    found = imports_of(source, "sunfish.cli", is_package=False, known=KNOWN)
    assert found == {"os", "typing", "sunfish.a", "sunfish.b", "pipeline.common", "sunfish.pkg.sub"}


def test_relative_imports_resolve_from_a_package_and_from_a_module():
    assert imports_of("from .sub import x\nfrom .. import a", "sunfish.pkg", True, KNOWN) == {
        "sunfish.pkg.sub", "sunfish.a"}
    assert imports_of("from . import sub\nfrom ..a import y", "sunfish.pkg.sub", False, KNOWN) == {
        "sunfish.pkg.sub", "sunfish.a"}


def test_a_pipeline_import_in_the_library_is_reported():
    fake = {"sunfish.cli": {"click", "pipeline.validate"}, "sunfish.config": {"yaml"},
            "pipeline.validate": {"sunfish.config"}}
    assert forbidden_imports(fake, "sunfish", ["pipeline"]) == ["sunfish.cli -> pipeline.validate"]


def test_a_model_importing_training_is_reported():
    fake = {"sunfish.models.x": {"torch", "sunfish.training.loop", "sunfish.models.layers"},
            "sunfish.modelsx": {"sunfish.training"},  # a name that only starts alike is not a model
            "sunfish.training.loop": {"sunfish.models.x"}}
    assert forbidden_imports(fake, "sunfish.models", MODELS_MAY_NOT_IMPORT) == [
        "sunfish.models.x -> sunfish.training.loop"]


def test_cycles_are_reported_lazy_or_not():
    lazy_cycle = {
        "sunfish.cli": {"sunfish.sampling"},
        "sunfish.sampling": {"sunfish.cli"},  # e.g. an import inside a function
        "sunfish.tracking": {"sunfish.tracking_sync", "json"},
        "sunfish.tracking_sync": {"sunfish.tracking"},
        "sunfish.config": {"yaml"},
        "sunfish.self": {"sunfish.self"},
        "sunfish.a": {"sunfish.b"}, "sunfish.b": {"sunfish.c"}, "sunfish.c": {"sunfish.a", "sunfish.config"},
    }
    assert import_cycles(lazy_cycle) == [["sunfish.a", "sunfish.b", "sunfish.c"], ["sunfish.cli", "sunfish.sampling"],
                                         ["sunfish.self"], ["sunfish.tracking", "sunfish.tracking_sync"]]
    assert import_cycles({"sunfish.a": {"sunfish.b"}, "sunfish.b": {"sunfish.config"}, "sunfish.config": set()}) == []


def test_a_package_importing_from_its_own_init_is_a_cycle_but_the_implicit_parent_is_not(tmp_path):
    (tmp_path / "sunfish" / "pkg").mkdir(parents=True)
    (tmp_path / "sunfish" / "__init__.py").write_text("")
    (tmp_path / "sunfish" / "pkg" / "__init__.py").write_text("from sunfish.pkg.sub import x\n")
    (tmp_path / "sunfish" / "pkg" / "sub.py").write_text("import json\nx = 1\n")
    (tmp_path / "sunfish" / "pkg" / "other.py").write_text("from sunfish.pkg.sub import x\n")
    graph = import_graph(project_modules(tmp_path, ["sunfish"]))
    assert graph["sunfish.pkg"] == {"sunfish.pkg.sub"} and import_cycles(graph) == []
    (tmp_path / "sunfish" / "pkg" / "sub.py").write_text("def f():\n    from sunfish.pkg import y\n")
    assert import_cycles(import_graph(project_modules(tmp_path, ["sunfish"]))) == [["sunfish.pkg", "sunfish.pkg.sub"]]


def test_a_long_module_is_reported(tmp_path):
    (tmp_path / "sunfish").mkdir()
    (tmp_path / "sunfish" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "sunfish" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_modules(project_modules(tmp_path, ["sunfish"])) == {"sunfish.long": MAX_LINES + 1}


def test_a_module_that_loads_torch_is_reported(tmp_path):
    (tmp_path / "heavy.py").write_text("import torch\n")
    code = "import sys, heavy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "True"
