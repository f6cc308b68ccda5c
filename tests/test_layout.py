"""The layout of ``kflats/``: no import circle between files, no private name
imported from another subpackage, no module over 500 lines.

A file's subpackage is its folder. Every import is counted, those inside
functions included: an import put off until call time is still a dependency.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kflats"
MAX_LINES = 500


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


FILES = _files()


def _absolute(importer, node):
    """The absolute module a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module
    base = importer.split(".")
    if FILES[importer].name != "__init__.py":
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports():
    """``(importer, imported file's module, name)`` for every import of kflats."""
    found = []
    for importer, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(importer, node)
                if source is None or source.split(".")[0] != "kflats":
                    continue
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    if child in FILES:  # a submodule, imported by name
                        found.append((importer, child, None))
                    else:
                        found.append((importer, source, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "kflats":
                        found.append((importer, alias.name, None))
    return found


def _folder(module):
    return FILES[module].parent


def circles(edges):
    """The strongly connected components of more than one file (Tarjan)."""
    graph = {}
    for a, b in edges:
        if a != b:
            graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def private_crossings(found):
    return sorted(
        f"{importer} imports {name} from {source}"
        for importer, source, name in found
        if name is not None
        and name.startswith("_")
        and not (name.startswith("__") and name.endswith("__"))
        and source in FILES
        and _folder(importer) != _folder(source)
    )


def test_every_import_names_a_file_of_kflats():
    missing = sorted({s for _, s, _ in imports() if s not in FILES})
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_import_circle_between_files():
    found = circles({(a, b) for a, b, _ in imports() if b in FILES})
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_imported_from_another_subpackage():
    crossings = private_crossings(imports())
    assert not crossings, (
        "make these names public in their home, or move the caller:\n"
        + "\n".join(crossings)
    )


def test_no_module_over_500_lines():
    long = {
        m: n
        for m, p in FILES.items()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({("a", "b"), ("b", "a")}, [["a", "b"]]),
        ({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}, [["a", "b", "c"]]),
        ({("a", "b"), ("b", "c"), ("a", "c")}, []),
        ({("a", "a")}, []),
    ],
)
def test_circles_finds_exactly_the_cycles(edges, expected):
    assert circles(edges) == expected
