"""Splits of an image folder: what ``splits.<split>`` may say, and splits that never overlap.

A split is a class list (a text file or a YAML list, ``<class>`` or ``<group>/<class>`` a
line), a ``filename,label`` CSV (Ravi & Larochelle's miniImageNet files) or a fraction of the
classes no list names (seeded by ``split_seed``). A relative split file is looked up under
``root``, then in the ``task`` config group in use, then in sharebone's own ``tasks/`` (where
``tasks/splits/<benchmark>/`` ships the published splits). Two splits holding the same class,
or the same image, are refused whatever forms they were given in (:func:`check_disjoint`).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sharebone import config
from sharebone.data.archives import DataError, DataNotFoundError, require_regular_file
from sharebone.data.image_folder.classes import (
    ClassEntry,
    Folder,
    check_root,
    folder_entry,
    folder_ident,
    image_idents,
    inside,
    label_ident,
    refuse_escape,
    scan_classes,
)
from sharebone.errors import SettingError

__all__ = ["SplitSpec", "TASKS_DIR", "check_disjoint", "check_listed", "csv_classes",
           "find_split_file", "folder_splits", "fraction_split", "listed", "match_classes",
           "parse_split", "tasks_dirs"]

#: sharebone's ``tasks/`` folder (the ``task`` config group), where the published split files
#: ship: ``tasks/splits/<benchmark>/``.
TASKS_DIR = config.OWN_CONFIG_DIR / "task"


def tasks_dirs() -> list[Path]:
    """Where relative split files are looked up after ``root``: the ``task`` config group in
    use (``$SHAREBONE_CONFIG_DIR/task``), then sharebone's own ``tasks/``."""
    return list(dict.fromkeys([Path(config.CONFIG_DIR) / "task", TASKS_DIR]))


@dataclass
class SplitSpec:
    """One ``splits.<split>`` value, parsed."""

    kind: str  # "classes" | "csv" | "fraction"
    where: str  # for messages: the file, or "splits.<split>"
    entries: list[str] = field(default_factory=list)
    fraction: float = 0.0
    path: Path | None = None


def find_split_file(value: str, root: Path) -> Path:
    """A split file named in a config: absolute, else under ``root``, else under ``tasks/``."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [root / path,
                                                    *(d / path for d in tasks_dirs())]
    for candidate in candidates:
        if candidate.exists():
            require_regular_file(candidate)
            return candidate
    raise DataNotFoundError(f"Split file {value!r} not found (looked for "
                            f"{' and '.join(str(c) for c in candidates)}).")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"Split file {path} is not UTF-8 text ({e}).") from e
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse_split(split: str, value: Any, root: Path) -> SplitSpec:
    """One ``splits.<split>`` value: a file (``.csv`` or a class list), a list of classes, a
    fraction, or ``{classes: ...}`` / ``{csv: ...}`` / ``{fraction: ...}``."""
    where = f"splits.{split}"
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in ("classes", "csv", "fraction"):
            raise SettingError(f"{where} must have exactly one of classes, csv, fraction; got "
                               f"{dict(value)!r}.")
        kind, value = next(iter(value.items()))
        if kind == "csv" and not isinstance(value, str):
            raise SettingError(f"{where}.csv must be a file name, got {value!r}.")
        if kind == "fraction" and isinstance(value, str):
            raise SettingError(f"{where}.fraction must be a number, got {value!r}.")
    if isinstance(value, bool) or value is None:
        raise SettingError(f"{where} must be a split file, a list of classes or a fraction, got "
                           f"{value!r}.")
    if isinstance(value, int | float):
        if not 0 < value <= 1:
            raise SettingError(f"{where}: a fraction of the classes must be in (0, 1], got "
                               f"{value!r}.")
        return SplitSpec("fraction", where, fraction=float(value))
    if isinstance(value, str):
        path = find_split_file(value, root)
        if path.suffix.lower() == ".csv":
            return SplitSpec("csv", str(path), path=path)
        entries = _read_lines(path)
        if not entries:
            raise DataError(f"Split file {path} names no classes.")
        return SplitSpec("classes", str(path), entries=entries, path=path)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value) and value:
        return SplitSpec("classes", where, entries=[str(v).strip() for v in value])
    raise SettingError(f"{where} must be a split file, a non-empty list of classes or a fraction, "
                     f"got {value!r}.")


def match_classes(spec: SplitSpec, available: Mapping[str, str],
                  describe: str) -> list[tuple[str, str, str]]:
    """``(entry name, available class, group)`` for each line of a class list.

    A line matches the class of that name; else ``<group>/<class>`` where ``<class>`` is a
    class's name (the group then comes from the line); else the one class whose folder has
    the line's last part as its name. Every unknown line is listed at once.
    """
    leaf: dict[str, list[str]] = {}
    for name in available:
        leaf.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    out, unknown, ambiguous, seen = [], [], [], set()
    for entry in spec.entries:
        if entry in seen:
            continue
        seen.add(entry)
        if entry in available:
            out.append((entry, entry, available[entry]))
            continue
        parts = entry.split("/")
        tails = [("/".join(parts[:k]), "/".join(parts[k:])) for k in range(1, len(parts))]
        match = next(((group, tail) for group, tail in tails if tail in available), None)
        if match is not None:
            out.append((entry, match[1], match[0]))
            continue
        names = leaf.get(parts[-1], [])
        prefix = "/".join(parts[:-1])
        if len(names) == 1:
            out.append((entry, names[0], prefix or available[names[0]]))
        elif names:
            ambiguous.append(f"{entry} ({', '.join(names)})")
        else:
            unknown.append(entry)
    if unknown or ambiguous:
        _refuse_unmatched(spec, available, describe, unknown, ambiguous)
    return out


def _refuse_unmatched(spec: SplitSpec, available: Mapping[str, str], describe: str,
                      unknown: list[str], ambiguous: list[str]) -> None:
    problems = []
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8
                                          else "")
        problems.append(f"{len(unknown)} class(es) that {describe} does not have: {shown}")
    if ambiguous:
        problems.append(f"ambiguous class(es) {', '.join(ambiguous[:5])}: write their "
                        "path under the root")
    known = sorted(available)
    raise DataError(f"{spec.where} names {'; and '.join(problems)}. {describe} has "
                    f"{len(known)} classes, e.g. {', '.join(known[:5])}. Fix the split file "
                    "or task.root.")


def _split_key(split: str, where: str) -> str:
    """``task.family.splits.<split>``, with the file it names when it names one."""
    key = f"task.family.splits.{split}"
    return key if where == f"splits.{split}" else f"{key} ({where})"


def check_disjoint(chosen: Mapping[str, Mapping[str, str]], wheres: Mapping[str, str],
                   what: str = "class(es)") -> None:
    """Refuse two splits holding the same class (or image): ``chosen`` is split -> {identity:
    name shown}, the identity being what makes two entries the same (a resolved folder, a
    label), whatever form (fraction, class list, CSV) each split was given in."""
    owner: dict[str, str] = {}
    for split, idents in chosen.items():
        for ident in idents:
            other = owner.setdefault(ident, split)
            if other == split:
                continue
            both = sorted(chosen[split][i] for i in set(chosen[split]) & set(chosen[other]))
            raise DataError(
                f"{_split_key(other, wheres[other])} and {_split_key(split, wheres[split])} "
                f"overlap: both hold {len(both)} {what}, e.g. {', '.join(both[:5])}. A class "
                "belongs to one split (a test scored on training classes measures nothing); "
                "remove them from one of the two.")


def fraction_split(pool: list[str], specs: Mapping[str, SplitSpec],
                   seed: int) -> dict[str, list[str]]:
    """Split ``pool`` at random (``seed``) by the fractions of ``specs``, in split order."""
    total = sum(s.fraction for s in specs.values())
    if total > 1 + 1e-9:
        raise SettingError(f"The split fractions add up to {total:g} > 1: "
                         f"{ {k: s.fraction for k, s in specs.items()} }.")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    pool = sorted(pool)
    shuffled = [pool[i] for i in order]
    out, start, cumulative = {}, 0, 0.0
    for split, spec in specs.items():
        cumulative += spec.fraction
        stop = round(cumulative * len(pool))
        out[split] = shuffled[start:stop]
        if not out[split]:
            raise DataError(f"splits.{split}: a fraction of {spec.fraction:g} of {len(pool)} "
                            "classes is no class at all; raise it or add classes.")
        start = stop
    return out


def listed(split: str, value: Any, root: Path) -> dict[str, str]:
    """Class -> its line in the split's class list (``<category>/<wnid>``), if it has one."""
    if not isinstance(value, str) or value.lower().endswith(".csv"):
        return {}
    return {e.rpartition("/")[2]: e for e in parse_split(split, value, root).entries}


def check_listed(split: str, value: Any, root: Path, names: list[str], where: str) -> None:
    """A pickle's classes must be the configured class list's, when there is one."""
    if not isinstance(value, str) or value.lower().endswith(".csv"):
        return
    spec = parse_split(split, value, root)
    wanted = {e.rpartition("/")[2] for e in spec.entries}
    if wanted != set(names):
        extra, absent = sorted(set(names) - wanted), sorted(wanted - set(names))
        raise DataError(
            f"{where} holds other classes than {spec.where} lists for split '{split}' "
            f"(not listed: {extra[:5]}; missing: {absent[:5]}). Is it another split's "
            "file?")


# ------------------------------------------------------------------- splits of a folder


def folder_splits(root: Path, splits: Mapping[str, Any],
                  seed: int) -> dict[str, list[ClassEntry]]:
    """Every split's classes, matched against the folder, checked disjoint (by class and
    by image, across all split forms)."""
    root = check_root(root)
    specs = {s: parse_split(s, v, root) for s, v in splits.items()}
    folders = None
    if any(spec.kind != "csv" for spec in specs.values()):
        folders = {f.name: f for f in scan_classes(root)}
    chosen: dict[str, list[ClassEntry]] = {}
    for split, spec in specs.items():
        if spec.kind == "classes":
            matched = match_classes(spec, {n: f.group for n, f in folders.items()},
                                    f"{root}")
            chosen[split] = [folder_entry(folders[name], entry, group)
                             for entry, name, group in matched]
        elif spec.kind == "csv":
            chosen[split] = csv_classes(spec, root, folders)
    wheres = {s: specs[s].where for s in specs}
    check_disjoint({s: {c.ident: c.name for c in cs} for s, cs in chosen.items()}, wheres)
    fractions = {s: spec for s, spec in specs.items() if spec.kind == "fraction"}
    if fractions:
        taken = {c.ident for cs in chosen.values() for c in cs}
        taken_images = {i for cs in chosen.values() for c in cs
                        for i in image_idents(root, c.items)}
        pool = [n for n, f in folders.items() if folder_ident(f) not in taken
                and taken_images.isdisjoint(image_idents(root, f.files))]
        for split, names in fraction_split(pool, fractions, seed).items():
            chosen[split] = [folder_entry(folders[n], n, folders[n].group) for n in names]
    check_disjoint({s: {i: f"{rel} ({c.name})" for c in cs
                        for i, rel in image_idents(root, c.items).items()}
                    for s, cs in chosen.items()}, wheres, "image(s)")
    return {s: sorted(chosen[s], key=lambda c: c.name) for s in splits}


def _csv_rows(path: Path) -> list[list[str]]:
    """The non-empty rows of a ``filename,label`` CSV, without its header."""
    try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the header
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"Split file {path} is not UTF-8 text ({e}).") from e
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    return rows


def csv_classes(spec: SplitSpec, root: Path,
                folders: Mapping[str, Folder] | None = None) -> list[ClassEntry]:
    """Ravi & Larochelle's ``filename,label`` rows as classes of files (a label that names
    a class folder is that class, for the splits' disjointness)."""
    rows = _csv_rows(spec.path)
    real_root = os.path.realpath(root)
    by_label: dict[str, list[list[Any]]] = {}
    first: dict[str, tuple[int, str]] = {}  # file -> (line, label) where it was listed
    missing, bad, repeated = [], [], []
    for number, row in enumerate(rows, start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            bad.append(f"line {number}: {','.join(row)!r}")
            continue
        name, label = row[0].strip(), row[1].strip()
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or "/" in label or label in ("..", "."):
            raise DataError(f"{spec.path} line {number}: {name!r} ({label!r}) is not a "
                            "file name inside task.root; refusing it.")
        for candidate in (root / "images" / name, root / label / name, root / name):
            if candidate.is_file():
                if not inside(real_root, str(candidate)):
                    refuse_escape(real_root, candidate, root)
                    raise DataError(f"{candidate} leads outside {root}; refusing it.")
                rel = os.path.relpath(candidate, root)
                line, seen_as = first.setdefault(rel, (number, label))
                if line != number:  # the same image twice: once is enough, two classes not
                    if seen_as != label:
                        raise DataError(
                            f"{spec.path} line {number}: {name} is labelled {label!r}, and "
                            f"{seen_as!r} on line {line}; an image has one class. Fix the "
                            "split file.")
                    repeated.append(number)
                    break
                st = candidate.stat()
                by_label.setdefault(label, []).append([rel, st.st_size, st.st_mtime_ns])
                break
        else:
            missing.append(name)
    _check_csv(spec, root, bad, missing, by_label, repeated)
    return [ClassEntry(label, "", f"class {label} of {spec.path}", sorted(files),
                       label_ident(label, folders)) for label, files in by_label.items()]


def _check_csv(spec: SplitSpec, root: Path, bad: list[str], missing: list[str],
               by_label: Mapping[str, Any], repeated: list[int]) -> None:
    """Refuse a CSV with bad rows, missing images or none; warn of repeated rows."""
    if bad:
        raise DataError(f"{spec.path} has rows that are not filename,label: "
                        f"{'; '.join(bad[:5])}.")
    if missing:
        raise DataError(
            f"{len(missing)} image(s) named in {spec.path} are not in {root} (looked for "
            f"images/<filename>, <label>/<filename> and <filename>), e.g. "
            f"{', '.join(missing[:5])}. Fix: point task.root at the folder holding them.")
    if not by_label:
        raise DataError(f"Split file {spec.path} names no images.")
    if repeated:  # an image twice in a class could be its own support and query
        warnings.warn(f"{spec.path}: {len(repeated)} row(s) repeat an earlier row (lines "
                      f"{', '.join(map(str, repeated[:5]))}); each image is read once.",
                      stacklevel=6)
