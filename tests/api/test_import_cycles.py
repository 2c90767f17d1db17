"""No import cycles inside the installed package: every module of kvjax (with kvjax.models,
kvjax.pallas_kernels and their sub-packages) is parsed with `ast`, its imports resolved (relative
ones too, and those inside functions, which run later but still tie the two modules together),
and the graph of module -> imported module must have no cycle. Importing `a.b.c` also runs the
`__init__` of `a` and `a.b`; those package edges are left out (every module would otherwise sit
in a cycle with its own package), but `from a.b import name` counts as an import of the package
`a.b` unless `a.b.name` is a module."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest

ROOTS = ("kvjax", "kvjax.models", "kvjax.pallas_kernels")


def _modules() -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is_package) for every module under ROOTS, found on disk from the
    installed packages' locations (editable or not)."""
    found: dict[str, tuple[str, bool]] = {}

    def walk(name: str, folder: str) -> None:
        found[name] = (os.path.join(folder, "__init__.py"), True)
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.endswith(".py") and entry != "__init__.py":
                found[f"{name}.{entry[:-3]}"] = (path, False)
            elif os.path.isfile(os.path.join(path, "__init__.py")) and f"{name}.{entry}" not in found:
                walk(f"{name}.{entry}", path)

    for root in ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None and spec.submodule_search_locations, f"{root} is not an installed package"
        walk(root, next(iter(spec.submodule_search_locations)))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(name: str, path: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The modules under ROOTS that module `name` imports anywhere in its body."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):  # annotations only: never imported at run time
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, is_pkg, known) for name, (path, is_pkg) in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:  # the shortest cycle through the component's first module (BFS)
        members, start = set(comp), comp[0]
        prev = {start: None}
        frontier = [start]
        while frontier and start not in {w for v in frontier for w in graph[v] if w in members}:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_the_walk_sees_the_whole_package():
    graph = import_graph()
    for name in ("kvjax.attention", "kvjax.models.llama", "kvjax.pallas_kernels.packing", "kvjax.quant.kivi"):
        assert name in graph, name
    assert "kvjax.pallas_kernels.packing" in graph["kvjax.quant.kivi"]


def test_cycles_are_found():
    """The detector itself, on a made-up graph."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail("import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles))
