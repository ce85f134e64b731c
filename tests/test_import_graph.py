"""diffalign's own modules import each other without cycles, counting the imports written inside functions.

A lazy import inside a function hides a cycle from Python at import time but not from a reader: the two modules still
need each other. The graph is built from the source (ast), so it also sees imports that no test executes.
`diffalign.rewards` and `diffalign.pipelines` are the top-level `rewards/` and `pipelines/` folders (pyproject's
`package-dir`). Only explicit imports count: a module does not depend on its parent package merely by living in it.
"""

import ast
import os
from typing import Dict, List, Set

import diffalign

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(diffalign.__file__)))
# folder -> the package name it is imported as
PACKAGES = {"diffalign": "diffalign", "rewards": "diffalign.rewards", "pipelines": "diffalign.pipelines"}


def _modules() -> Dict[str, str]:
    """`{module name: file path}` of every module of diffalign (with the mapped `rewards/` and `pipelines/`)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            relative = os.path.relpath(directory, os.path.join(ROOT, folder))
            parts = [package] + ([] if relative == "." else relative.split(os.sep))
            for name in files:
                if not name.endswith(".py"):
                    continue
                module = ".".join(parts if name == "__init__.py" else parts + [name[:-3]])
                modules[module] = os.path.join(directory, name)
    return modules


def _imported(module: str, path: str, known: Set[str]) -> Set[str]:
    """The modules of `known` that `module` imports anywhere in its file (module level or inside functions)."""
    is_package = os.path.basename(path) == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from package import submodule` imports the submodule; `from module import name` the module
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` depends on the deepest of a.b.c, a.b, a that is one of ours
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {module: _imported(module, path, set(modules)) for module, path in modules.items()}


def strongly_connected(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected components of more than one module (Tarjan): the modules that import each other."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One closed import path through each strongly connected component."""
    return [_closed_path(graph, component) for component in strongly_connected(graph)]


def _closed_path(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    """A shortest path from the component's first module back to itself (breadth-first inside the component)."""
    start = min(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & component):
            if target == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    return sorted(component)


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    graph = import_graph()
    assert "diffalign.rewards.digits" in graph and "diffalign.pipelines" in graph  # the mapped folders
    assert "diffalign.cli.parser" in graph["diffalign.cli.train"]  # `from diffalign.cli.parser import ...` in a function
    assert "diffalign.logprob" in graph["diffalign.rollout"]  # `from .logprob import ...`
    assert "diffalign.rewards" in graph["diffalign.trainers.base"]  # absolute import of a mapped folder


def test_cycles_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_diffalign_has_no_import_cycles():
    graph = import_graph()
    found = [f"{' -> '.join(_closed_path(graph, c))} (the cycle joins {', '.join(sorted(c))})"
             for c in strongly_connected(graph)]
    assert not found, "import cycles among diffalign's modules:\n" + "\n".join(found)


def test_utilities_import_nothing_above_them():
    """`diffalign.errors` and `diffalign.utils.*` sit at the bottom: any module may import them, they import only each
    other (so no cycle can run through them)."""
    graph = import_graph()
    bottom = {m for m in graph if m == "diffalign.errors" or m.startswith("diffalign.utils.")}
    assert "diffalign.utils.peft_utils" in bottom and "diffalign.utils.hub_utils" in bottom
    above = {m: sorted(graph[m] - bottom - {"diffalign.utils"}) for m in sorted(bottom)}
    assert not any(above.values()), {m: targets for m, targets in above.items() if targets}


def test_nothing_inside_diffalign_imports_the_config_shim():
    """`diffalign.config` only re-exports the config names for user code (the classes live beside their trainers, the
    parser in `diffalign.cli.parser`); a module of the package importing it would hide where a name lives."""
    graph = import_graph()
    assert "diffalign.config" in graph
    importers = sorted(m for m, targets in graph.items() if "diffalign.config" in targets)
    assert importers == [], importers

