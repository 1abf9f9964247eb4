"""vlm2emb's modules import each other without cycles.

The test reads every module of the package with :mod:`ast` (nothing is imported) and builds
the graph of the imports between them: module-level imports and the imports inside
functions and methods alike, because an import moved into a function to dodge a cycle is
still a cycle (it only fails later, or depends on what was imported first). Imports under
``if TYPE_CHECKING:`` are left out: they never run.

An edge goes to the module an import names: ``from vlm2emb.data.schema import X`` and
``import vlm2emb.data.schema`` to ``vlm2emb.data.schema``, ``from vlm2emb.data import schema``
to the submodule, ``from vlm2emb.eval import evaluate`` to the package ``vlm2emb.eval``
(its ``__init__``). The parent packages Python imports on the way (``vlm2emb``,
``vlm2emb.data``) are not edges: a package ``__init__`` that re-exports its submodules
would otherwise form a cycle with each of them.

Run it as a script (``python tests/test_import_graph.py``) to print the graph's cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlm2emb"


def package_modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module under ``root``."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """``(dotted name, line)`` of every import that runs, outside ``if TYPE_CHECKING:``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.append((source, node.lineno))
            # ``from package import submodule`` imports the submodule too.
            found.extend((f"{source}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {module it imports: line of the first such import}, within the package."""
    modules = package_modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in modules.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(ast.parse(path.read_text(), str(path)), module, is_package):
            # ``from vlm2emb.x import name`` where name is no submodule: the edge is to x,
            # which the entry for the source itself already records.
            if name in modules and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """One cycle's modules and the import lines that tie them together."""
    members = set(component)
    lines = [" <-> ".join(component)]
    for module in component:
        for target, line in sorted(graph[module].items()):
            if target in members:
                lines.append(f"    {module} (line {line}) imports {target}")
    return "\n".join(lines)


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = cycles(graph)
    assert not found, "import cycles in vlm2emb:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_checker_finds_cycles_and_ignores_type_checking_imports(tmp_path):
    pkg = tmp_path / "vlm2emb"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")  # a function-level import
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from vlm2emb import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlm2emb import d\n"
    )
    (pkg / "d.py").write_text("import vlm2emb.c\n")
    graph = import_graph(pkg)
    assert graph["vlm2emb.a"] == {"vlm2emb.sub.b": 2, "vlm2emb.sub": 2}
    assert graph["vlm2emb.sub.b"] == {"vlm2emb": 1, "vlm2emb.a": 1}
    assert graph["vlm2emb.c"] == {}
    assert cycles(graph) == [["vlm2emb.a", "vlm2emb.sub.b"]]
    assert "vlm2emb.a (line 2) imports vlm2emb.sub.b" in describe(graph, cycles(graph)[0])


if __name__ == "__main__":
    graph = import_graph()
    found = cycles(graph)
    print("\n".join(describe(graph, c) for c in found) or f"no cycles among {len(graph)} modules")
    sys.exit(1 if found else 0)
