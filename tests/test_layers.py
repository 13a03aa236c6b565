"""The package's import graph: layers, bottom to top, and no import that runs back up.

Every import counts: at module level, inside a function (lazy), under ``TYPE_CHECKING`` and in
a ``__main__`` block. A lazy import still ties two modules together, so a cycle dodged by
importing late is still a cycle. The layers are written once, in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sharebone

SRC = Path(sharebone.__file__).resolve().parent
ROOT = "sharebone"

#: Bottom to top: a module may import its own layer and the layers below it, never above.
#: (``sharebone/__init__.py`` is a lazy facade over the layers; ``__main__`` sits on top.)
LAYERS: list[tuple[str, ...]] = [
    ("errors", "files", "config", "registry", "memory", "task_kind", "adaptation"),
    ("checkpoint_io",),
    ("callbacks",),
    ("data",),
    ("models",),
    ("regimes",),
    ("evaluation",),
    ("tracking",),
    ("run",),
    ("__main__",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sharebone modules it imports, anywhere in its file."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
                    # Importing a.b.c first runs package a.b's __init__ (unless we are in it;
                    # the root's __init__ imports nothing when it runs).
                    parent = target.rpartition(".")[0]
                    while parent in modules and parent != ROOT \
                            and not (name + ".").startswith(parent + "."):
                        graph[name].add(parent)
                        parent = parent.rpartition(".")[0]
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path that closes it. A package's ``__init__`` re-exporting
    its own modules is not a cycle (Python runs it before them)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if node.startswith(child + "."):  # a module importing its own package
                continue
            if state.get(child) == "open":
                found.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child, [*path, child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of a module's top-level module or package."""
    top = module.split(".")[1] if "." in module else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m != ROOT
                  for t in targets if layer(t) > layer(m))


def test_no_import_cycle_lazy_and_type_checking_imports_included():
    assert cycles(import_graph()) == []


def test_no_package_imports_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_root_facade_imports_nothing_when_it_runs():
    tree = ast.parse((SRC / "__init__.py").read_text())
    runtime = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
               and any(a.name.startswith(ROOT) for a in n.names)
               or isinstance(n, ast.ImportFrom) and (n.module or "").startswith(ROOT)]
    assert runtime == []


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in import_graph() if m != ROOT)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"sharebone.data.tasks": {"sharebone.run.train"}}) == [
        "sharebone.data.tasks -> sharebone.run.train"]


def test_at_most_eight_modules_at_the_top():
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= 8, top


#: A module or function longer than this is doing more than one job (issue 20).
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 700, 80


def test_no_module_over_700_lines_and_no_function_over_80():
    long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long.append(f"{module_name(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert long == []
