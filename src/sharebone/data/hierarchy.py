"""Class hierarchies for Meta-Dataset's ILSVRC episodes (Triantafillou et al., ICLR 2020,
section 3.2; ``meta_dataset/data/sampling.py``, ``use_dag_hierarchy``).

Meta-Dataset draws an ILSVRC episode's classes from the WordNet graph over the split's
classes: an internal node is chosen uniformly among those spanning between ``min_ways`` and
:data:`MAX_SPANNING_LEAVES` of the split's classes, and the episode takes the leaves it spans
(``max_ways`` of them, at random, when it spans more). Episodes hold related classes (dogs,
instruments), which is harder than classes drawn from all 712.

A hierarchy file is data, one internal node a line, its children after it (whitespace
separated; ``#`` starts a comment)::

    n02075296 n02083346 n02120997 n02131653
    n02083346 n02084071 n02114100

A child that is no line's parent is a leaf: a class of the split. The files of Meta-Dataset's
three ILSVRC subgraphs ship in ``tasks/splits/meta_dataset/ilsvrc_2012/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharebone.data.archives import DataError, require_regular_file
from sharebone.errors import SettingError

__all__ = ["MAX_SPANNING_LEAVES", "ClassHierarchy", "leaf_name", "split_hierarchies"]

#: A node spanning more leaves than this is never chosen (Meta-Dataset's
#: ``MAX_SPANNING_LEAVES_ELIGIBLE``: the smallest bound that leaves every ILSVRC training
#: class reachable; a larger one would make more episodes a random subset of a huge node).
MAX_SPANNING_LEAVES = 392
#: A hierarchy file larger than this is refused before it is read (WordNet's whole noun graph
#: is under 2 MB; ILSVRC's training subgraph is 30 KB).
MAX_FILE_BYTES = 16 << 20


@dataclass(frozen=True)
class ClassHierarchy:
    """A DAG over class names: internal node -> its children (leaves are the classes).

    Example:
        >>> h = ClassHierarchy({"animal": ("dog", "cat"), "dog": ("husky", "pug"),
        ...                     "cat": ("lynx", "tabby")})
        >>> sorted(h.leaves())
        ['husky', 'lynx', 'pug', 'tabby']
        >>> [sorted(s) for s in h.spans().values()]
        [['husky', 'lynx', 'pug', 'tabby'], ['husky', 'pug'], ['lynx', 'tabby']]
        >>> [p.tolist() for p in h.pools(["husky", "pug", "lynx", "tabby"], min_ways=2)]
        [[0, 2, 1, 3], [2, 3], [0, 1]]
    """

    children: dict[str, tuple[str, ...]]
    source: str = "the class hierarchy"

    @classmethod
    def read(cls, path: str | Path, key: str) -> ClassHierarchy:
        """Parse a hierarchy file (see the module's docstring); errors name ``key``."""
        path = Path(path)
        require_regular_file(path)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{key}: {path} is {path.stat().st_size} bytes, more than a class "
                            f"hierarchy's {MAX_FILE_BYTES} limit. Fix: point {key} at a file of "
                            "'<node> <child> <child> ...' lines.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{key}: {path} is not UTF-8 text ({e}).") from e
        children: dict[str, tuple[str, ...]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise DataError(f"{key}: {path} line {number} names node {tokens[0]!r} without "
                                "children. Fix: '<node> <child> <child> ...', or drop the line "
                                "(a leaf needs no line).")
            if tokens[0] in children:
                raise DataError(f"{key}: {path} line {number} lists node {tokens[0]!r} a second "
                                "time. Fix: one line per node, all its children on it.")
            children[tokens[0]] = tuple(dict.fromkeys(tokens[1:]))
        if not children:
            raise DataError(f"{key}: {path} holds no node. Fix: '<node> <child> ...' lines.")
        hierarchy = cls(children, source=str(path))
        hierarchy.spans(key)  # refuses a cycle now, before any image is decoded
        return hierarchy

    def leaves(self) -> set[str]:
        """The names no line lists children of: the classes."""
        return {c for kids in self.children.values() for c in kids if c not in self.children}

    def spans(self, key: str = "hierarchy") -> dict[str, frozenset[str]]:
        """Internal node -> the leaves under it (nodes in file order). Iterative, so a deep
        chain cannot exhaust Python's stack; a cycle is refused."""
        spans: dict[str, frozenset[str]] = {}
        for start in self.children:
            if start in spans:
                continue
            stack, on_path = [(start, False)], {start}
            while stack:
                node, done = stack.pop()
                if done:
                    spans[node] = frozenset().union(*(
                        spans.get(c, frozenset((c,))) for c in self.children[node]))
                    on_path.discard(node)
                    continue
                stack.append((node, True))
                for child in self.children[node]:
                    if child in on_path:
                        raise DataError(f"{key}: {self.source} has a cycle through {child!r} "
                                        f"(a child of {node!r} is also above it). Fix: a "
                                        "hierarchy is a DAG: remove one of those lines.")
                    if child in self.children and child not in spans:
                        on_path.add(child)
                        stack.append((child, False))
        return {node: spans[node] for node in self.children}

    def check_classes(self, class_names: Sequence[str], key: str = "hierarchy") -> None:
        """Refuse classes that are not leaves of this hierarchy: they could never be drawn."""
        missing = sorted({leaf_name(n) for n in class_names} - self.leaves())
        if missing:
            raise SettingError(
                f"{key}: {len(missing)} class(es) of the split are not leaves of {self.source}, "
                f"e.g. {', '.join(missing[:5])}; they could never be drawn. Fix: the hierarchy "
                "of this split (its leaves are the split's classes), or no hierarchy.")

    def pools(self, class_names: Sequence[str], min_ways: int, key: str = "hierarchy",
              max_span: int = MAX_SPANNING_LEAVES) -> list[np.ndarray]:
        """Per eligible node (between ``min_ways`` and ``max_span`` of these classes under it;
        nodes and their classes sorted by name, as Meta-Dataset sorts them), the positions in
        ``class_names`` of its classes. A class may be named ``<group>/<class>``.

        Refused: a class the hierarchy does not hold (it could never be drawn), no eligible
        node, or a class under no eligible node."""
        position = {leaf_name(n): i for i, n in enumerate(class_names)}
        self.check_classes(class_names, key)
        pools: list[np.ndarray] = []
        for _node, under in sorted(self.spans(key).items()):
            ids = [position[c] for c in sorted(under) if c in position]  # by name
            if min_ways <= len(ids) <= max_span:
                pools.append(np.asarray(ids, dtype=np.int64))
        if not pools:
            raise SettingError(
                f"{key}: no node of {self.source} spans between min_ways={min_ways} and "
                f"{max_span} of the split's {len(position)} classes. Fix: lower "
                "sampler.meta_dataset.min_ways, or check that the hierarchy is this split's.")
        reached = set(np.concatenate(pools).tolist())
        unreached = sorted(str(class_names[i]) for i in set(range(len(class_names))) - reached)
        if unreached:
            raise SettingError(
                f"{key}: {len(unreached)} class(es) are under no node spanning between "
                f"min_ways={min_ways} and {max_span} classes, e.g. {', '.join(unreached[:5])}; "
                "they would never be drawn. Fix: lower sampler.meta_dataset.min_ways, or add "
                "a node above them to the hierarchy.")
        return pools


def leaf_name(class_name: str) -> str:
    """A class's name as a hierarchy names it: the last part of ``<group>/<class>``."""
    return str(class_name).rsplit("/", 1)[-1]


def split_hierarchies(value: Any, splits: Iterable[str],
                      find: Callable[[str], Path] | None = None,
                      key: str = "task.family.hierarchy") -> dict[str, ClassHierarchy | str]:
    """A family's ``hierarchy`` setting, per split: null (none), ``groups`` (every split's
    class groups as a two-level ontology), or ``{<split>: <hierarchy file> | groups | null}``.
    Files are found by ``find`` (None: this family takes ``groups`` only) and read now,
    before any image is decoded."""
    splits = list(splits)
    if value is None:
        return {}
    if value == "groups":
        return dict.fromkeys(splits, "groups")
    files = "a hierarchy file, " if find is not None else ""
    if not isinstance(value, Mapping):
        raise SettingError(f"{key} must be null, 'groups' or {{<split>: {files}groups | null}}, "
                           f"got {value!r}. Fix: {key}=groups, or a value per split.")
    unknown = sorted(str(s) for s in value if s not in splits)
    if unknown:
        raise SettingError(f"{key}.{unknown[0]}: no such split (this task has "
                           f"{', '.join(splits)}). Fix: name one of them.")
    out: dict[str, ClassHierarchy | str] = {}
    for split, entry in value.items():
        where = f"{key}.{split}"
        if entry is None:
            continue
        if entry == "groups":
            out[split] = "groups"
        elif isinstance(entry, str) and find is not None:
            out[split] = ClassHierarchy.read(find(entry), where)
        else:
            raise SettingError(f"{where} must be {files}groups or null, got {entry!r}.")
    return out
