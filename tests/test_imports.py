"""Imports inside clara_jax point one way: no module reaches back to one that imports it,
counting imports inside functions (an import cycle hidden in a function is still a cycle)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_graph() -> dict[str, set[str]]:
    """{module: the clara_jax modules it imports anywhere in its file}."""
    files = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "clara_jax")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                files[mod.removesuffix(".__init__")] = path

    def known(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in files else ""

    graph = {}
    for mod, path in files.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:   # `from pkg import module` imports the module
                    deps.add(known(f"{base}.{a.name}") if f"{base}.{a.name}" in files
                             else known(base))
        graph[mod] = deps - {"", mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_sees_imports_inside_functions():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    graph = module_graph()
    assert "clara_jax.train.compiled_step" in graph["clara_jax.train.train"]
    assert "clara_jax.train.setup" in graph["clara_jax.aot.compile"]
    assert "clara_jax.aot.compile" in graph["clara_jax.aot"]   # the package's __init__
    # aot imports train, never the reverse.
    assert not [(m, d) for m, deps in graph.items() if m.startswith("clara_jax.train")
                for d in deps if d.startswith("clara_jax.aot")]
    # convert/adapters.py wraps the bundle format in a Clara: it sits above clara.model.
    assert "clara_jax.clara.model" in graph["clara_jax.convert.adapters"]


def test_no_import_cycle_inside_clara_jax():
    found = cycles(module_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
