"""The package's import graph: no import runs back up (no cycles, none dodged by importing
inside a function), so every module can be read, tested and replaced from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

import sharebone

SRC = Path(sharebone.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sharebone modules it imports, at any depth (functions included)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        # Annotations only, or the block a module runs as a program (`python -m`): neither
        # runs when the module is imported, so neither can close an import cycle.
        typing_only = {id(n) for block in ast.walk(tree)
                       if _is_type_checking(block) or _is_main_block(block)
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
                    # Importing a.b.c first runs package a.b's __init__ (unless we are in it).
                    parent = target.rpartition(".")[0]
                    while parent in modules and not (name + ".").startswith(parent + "."):
                        graph[name].add(parent)
                        parent = parent.rpartition(".")[0]
                    break
    return graph


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in (
        "__name__ == '__main__'", '__name__ == "__main__"')


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


def test_no_import_runs_back_up():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_checkpoint_files_sit_below_the_regimes():
    graph = import_graph()
    assert not any(m.startswith("sharebone.regimes") for m in graph["sharebone.checkpoint_io"])
