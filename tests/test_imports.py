"""No import cycles inside the package: every `import` of an imm_jax module, at module level or inside a
function (where a cycle hides until the function runs), forms an acyclic graph."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "imm_jax"


def package_modules() -> dict:
    """{dotted module name: file path} of every module in the package (packages by their __init__)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(modules: dict) -> dict:
    """{module: set of package modules it imports anywhere in its source}."""
    def owner(name):  # the package module that defines `name` (a module, or a name inside one)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                if base.split(".")[0] == PACKAGE:
                    deps |= {owner(f"{base}.{a.name}") for a in node.names}
        graph[name] = deps - {name, ""}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module, or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycles():
    modules = package_modules()
    api, tuning = f"{PACKAGE}.inference.api", f"{PACKAGE}.inference.tuning"
    assert api in modules and tuning in modules
    graph = import_graph(modules)
    assert api in graph[tuning]  # the graph sees function- and module-level imports
    assert cycles(graph) == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles(graph))


@pytest.mark.parametrize("name", ["inference.api", "inference.tuning", "inference.tuned_vectors", "core.losses",
                                  "training.train"])
def test_modules_import_alone(name):
    import importlib
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{name}"], check=True, cwd=ROOT)
    importlib.import_module(f"{PACKAGE}.{name}")


def external_imports(path: str) -> set:
    """Top-level names of the non-package modules a file imports anywhere (e.g. {'jax', 'orbax'})."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {PACKAGE}


def test_layout_dependency_rules():
    """The layout's rules: core (the math) imports only jax/numpy/stdlib and core; networks never import core;
    only training/checkpointing imports orbax; nothing imports main."""
    modules = package_modules()
    graph = import_graph(modules)
    core = {m for m in modules if m.startswith(f"{PACKAGE}.core")}
    assert {f"{PACKAGE}.core.losses", f"{PACKAGE}.core.sampling"} <= core
    for m in sorted(core):
        assert graph[m] <= core, f"{m} imports {sorted(graph[m] - core)} outside core"
        assert external_imports(modules[m]) <= {"jax", "numpy", "__future__", "dataclasses", "functools", "math",
                                                "typing", "collections"}, (m, external_imports(modules[m]))
    for m in modules:
        if m.startswith(f"{PACKAGE}.networks"):
            assert not graph[m] & core, f"{m} imports {sorted(graph[m] & core)}"
        if m != f"{PACKAGE}.training.checkpointing":
            assert "orbax" not in external_imports(modules[m]), f"{m} imports orbax"
        assert f"{PACKAGE}.main" not in graph[m], f"{m} imports main"
