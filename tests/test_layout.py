"""The package's layout: no import circles between its modules, and every module ships.

Read from the source with ``ast`` (nothing is imported, no Spark session): the fast ring's.
"""

from __future__ import annotations

import ast
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "sparkml_dist"


def _modules(root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, whether it is a package's ``__init__``)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): its imports never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(imported name, line) for every ``import``/``from ... import`` that can run: at module level, inside
    functions and classes, under ``if``/``try``; not those under ``if TYPE_CHECKING:``. A relative import keeps
    its leading dots (``import_graph`` resolves it)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                for other in child.orelse:  # the else branch does run
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((base, node.lineno))
            # `from pkg import sub` imports the module pkg.sub when sub is one
            found.extend(
                (f"{base}.{alias.name}" if node.module else base + alias.name, node.lineno) for alias in node.names
            )
        visit(node)

    visit(tree)
    return found


def import_graph(root: Path = REPO) -> dict[str, dict[str, int]]:
    """module -> {package module it imports: first line}, from the import statements (see ``_imports``).

    An import of ``a.b.c`` is an edge to the deepest package module it names (``a.b.c``, or ``a.b`` when ``c``
    is a name in it). Not edges: the implicit import of a module's parent packages (a package's ``__init__``
    re-exporting its own submodules is then no circle), imports under ``if TYPE_CHECKING:`` (annotations
    only, never executed), and names looked up at run time by string (``registry.load``'s providers).
    """
    modules = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, (path, init) in modules.items():
        package = name if init else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for target, line in _imports(ast.parse(path.read_text(), str(path))):
            level = len(target) - len(target.lstrip("."))
            if level:  # relative: from the module's package, one level up per extra dot
                base = package.split(".")
                target = ".".join([*base[: len(base) - (level - 1)], target[level:]]).rstrip(".")
            if target.split(".")[0] != PACKAGE:
                continue
            dest = owner(target)
            if dest is not None and dest != name:
                edges.setdefault(dest, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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
            visit(v)
    return found


def test_no_import_cycles():
    """No module of the package imports, at its top or inside a function, one that imports it back (directly or
    through others): each piece lives in the module it belongs to, and the layers read one way."""
    graph = import_graph()
    found = cycles(graph)
    report = [
        " <-> ".join(c)
        + ": "
        + "; ".join(f"{a} imports {b} (line {graph[a][b]})" for a in c for b in graph[a] if b in c)
        for c in found
    ]
    assert not found, "import circles:\n" + "\n".join(report)


def test_the_cycle_finder_sees_function_local_and_relative_imports(tmp_path):
    """The check itself: a circle closed by an import inside a function, or by a relative import, is found; one
    under ``if TYPE_CHECKING:`` is not."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from sparkml_dist import b\n")
    (pkg / "b.py").write_text("def f():\n    from sparkml_dist.a import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import y\n")
    (pkg / "sub" / "c.py").write_text("import sparkml_dist.d\n")
    (pkg / "d.py").write_text("def g():\n    from .sub import y\n")
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sparkml_dist.f import z\n")
    (pkg / "f.py").write_text("from sparkml_dist.e import w\n")
    assert cycles(import_graph(tmp_path)) == [
        ["sparkml_dist.a", "sparkml_dist.b"],
        ["sparkml_dist.d", "sparkml_dist.sub", "sparkml_dist.sub.c"],
    ]


def test_the_py_files_zip_holds_every_module(tmp_path):
    """``package_library`` (spark-submit --py-files on a cluster) ships the sub-packages too."""
    from sparkml_dist.cluster import package_library

    names = set(zipfile.ZipFile(package_library(tmp_path)).namelist())
    expected = {path.relative_to(REPO).as_posix() for path, _ in _modules().values()}
    assert expected <= names, sorted(expected - names)
