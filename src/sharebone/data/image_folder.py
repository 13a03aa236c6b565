"""Any folder of images as a few-shot task family, and the natural-image benchmarks.

Layout (hidden entries such as ``.ipynb_checkpoints/`` are not data)::

    root/<class>/*.{png,jpg,jpeg,bmp,webp,gif}            a folder per class, or
    root/<group>/<class>/*.jpg                             grouped one level above

A group (an alphabet, a tieredImageNet category, a bird family) is what ``group_episodes``
draws episodes within. Splits (``splits.<split>``), in one of three forms:

- **class lists**: a text file (or a YAML list), one class per line, ``<class>`` or
  ``<group>/<class>`` (the group then comes from the line); lines starting with ``#`` are
  comments. A class is found by its folder's path under ``root`` or by its folder's own name.
- **CSV** ``filename,label`` (the Ravi & Larochelle miniImageNet files): each file is looked
  up as ``root/images/<filename>``, ``root/<label>/<filename>`` or ``root/<filename>``.
- **a fraction**: a seeded random split (``split_seed``) of the classes no list names.

A relative split file is looked up under ``root``, then in sharebone's ``tasks/`` folder (where
``tasks/splits/<benchmark>/`` ships the published splits).

``source`` says where the pixels come from: ``folder`` (the above), ``mini_imagenet_pickle``
(``root/mini-imagenet-cache-<split>.pkl``, dicts of ``image_data`` [N, 84, 84, 3] uint8 and
``class_dict`` name -> indices), ``tiered_imagenet_pickle`` (Ren et al.'s release,
``root/<split>_images_png.pkl`` and ``root/<split>_labels.pkl``:
:mod:`sharebone.data.tiered_release`; its 34 categories are the groups), ``cifar100``
(``root/cifar-100-python.tar.gz``, downloaded and md5-checked when missing; CIFAR-FS and FC100
take their classes from both of its batches), or ``auto`` (the miniImageNet pickles when
present, else the tieredImageNet release, else Ravi's ``<split>.csv`` files, else a folder).
Pickles are read with a restricted unpickler (numpy arrays, dicts, lists and str only) and tar
members in memory, never extracted.

Each split is decoded once, in parallel (``workers`` threads; Pillow decodes and resizes
without the GIL), into a uint8 ``[N, C, S, S]`` ``.npy`` cache under
``<cache_dir>/image_folder/``, written atomically and opened memory-mapped: the images are read
from the page cache as episodes need them, shared by every process that samples from them, and
never held in memory twice. The cache's name carries a hash of everything that changes its
contents (the files with their sizes and mtimes, image size, channels, resizing, the format
version); its header and a JSON sidecar are checked on every read, and a file that does not
match is rebuilt, never trusted.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import struct
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharebone import config
from sharebone.data.archives import (
    ArchiveSpec,
    DataError,
    DataNotFoundError,
    ensure_archives,
    load_data_pickle,
    read_tar_members,
    require_regular_file,
)
from sharebone.data.augment import EpisodeTransform, check_augment, check_normalize
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.families import register_family
from sharebone.data.images import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    check_decode_args,
    decode_array,
    to_chw,
)
from sharebone.data.omniglot import ImageSet
from sharebone.data.tiered_release import IMAGES_FILE as TIERED_IMAGES
from sharebone.data.tiered_release import LABELS_FILE as TIERED_LABELS
from sharebone.data.tiered_release import (
    NAMES_FILE,
    png_bytes,
    read_names,
    read_release,
    release_files,
)
from sharebone.errors import SettingError, UnknownNameError
from sharebone.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["CIFAR100", "ImageFolderTasks", "SOURCES", "scan_classes"]

#: Bumped whenever the cache's contents would change for the same settings.
FORMAT_VERSION = 1
CACHE_SUBDIR = "image_folder"
SOURCES = ("folder", "mini_imagenet_pickle", "tiered_imagenet_pickle", "cifar100", "auto")
CORRUPT_POLICIES = ("refuse", "skip")
MINI_IMAGENET_PICKLE = "mini-imagenet-cache-{split}.pkl"

#: The CIFAR-100 python archive (Krizhevsky 2009), as torchvision's ``CIFAR100`` checks it.
CIFAR100 = ArchiveSpec(name="cifar-100-python",
                       url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       md5="eb9058c3a382ffc7106e4002c42a8d85",
                       filename="cifar-100-python.tar.gz")
#: CIFAR-100's training batch is 150 MiB; nothing in the archive may be larger than this.
CIFAR_MAX_MEMBER_BYTES = 256 << 20

#: sharebone's ``tasks/`` folder (the ``task`` config group), where the published split files
#: ship: ``tasks/splits/<benchmark>/``.
TASKS_DIR = config.OWN_CONFIG_DIR / "task"


def tasks_dirs() -> list[Path]:
    """Where relative split files are looked up after ``root``: the ``task`` config group in
    use (``$SHAREBONE_CONFIG_DIR/task``), then sharebone's own ``tasks/``."""
    return list(dict.fromkeys([Path(config.CONFIG_DIR) / "task", TASKS_DIR]))

_NPY_MAGIC = b"\x93NUMPY\x01\x00"


# ------------------------------------------------------------------------------ the classes


@dataclass
class ClassEntry:
    """One class of a split: its name, its group and where its images come from."""

    name: str
    group: str
    where: str  # for messages: the folder, or the file and label
    items: list[Any] = field(default_factory=list)  # files ([path, size, mtime_ns]) or rows
    ident: str = ""  # what makes two splits' classes the same class (folder, label)


@dataclass
class _Folder:
    name: str  # path under root, "class" or "group/class"
    group: str
    path: Path
    files: list[list[Any]]  # [relative path, size, mtime_ns], sorted


def _visible(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _follows(entry: os.DirEntry, test: Callable[[], bool], broken: list[str]) -> bool:
    """``test()`` (``entry.is_dir``/``is_file``, which follow links), False for a broken link:
    a loop (ELOOP, which ``is_file`` raises) or a missing target, noted in ``broken``."""
    try:
        if test():
            return True
    except OSError:
        pass
    if entry.is_symlink() and not os.path.exists(entry.path):
        broken.append(entry.path)
    return False


def _is_image(entry: os.DirEntry, broken: list[str]) -> bool:
    return (os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
            and _follows(entry, entry.is_file, broken))


def _is_dir(entry: os.DirEntry, broken: list[str]) -> bool:
    return _follows(entry, entry.is_dir, broken)


def _warn_broken(broken: list[str]) -> None:
    if broken:
        warnings.warn(f"Skipped {len(broken)} broken symbolic link(s) (a loop, or a target "
                      f"that does not exist): {'; '.join(broken[:5])}"
                      + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
                      + ". They hold no image; remove or fix them to silence this.",
                      stacklevel=4)


def _inside(real_root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _refuse_escape(real_root: str, entry: os.DirEntry | Path, root: Path) -> None:
    path = entry.path if isinstance(entry, os.DirEntry) else str(entry)
    if os.path.islink(path) and not _inside(real_root, path):
        raise DataError(
            f"{path} is a symbolic link to {os.path.realpath(path)}, outside the data folder "
            f"{root}; sharebone reads nothing outside it. Fix: copy the data into {root}, or "
            "point task.root at a folder that holds all of it.")


def check_root(root: Path) -> Path:
    """``root`` as an existing folder, or a clear error naming it."""
    if not root.exists():
        raise DataNotFoundError(
            f"The data folder {root} does not exist. Fix: point the task at your images with "
            "`task.root=/path/to/images` (layout root/<class>/*.jpg).")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; task.root must be the folder that "
                        "holds the class folders (root/<class>/*.jpg).")
    return root


def scan_classes(root: str | os.PathLike[str]) -> list[_Folder]:
    """Every class folder under ``root`` (``root/<class>/`` or ``root/<group>/<class>/``).

    A broken symbolic link (a loop, a missing target) holds no image: it is skipped with a
    warning, like an entry that is not an image.

    Raises:
        DataError: ``root`` is missing, a file or holds no class folder; an image sits
            directly in ``root``; a symbolic link leads outside ``root``.
    """
    root = check_root(Path(root).expanduser())
    real_root = os.path.realpath(root)
    folders: list[_Folder] = []
    broken: list[str] = []
    top = _visible(root)
    stray = [e.path for e in top if _is_image(e, broken)]
    if stray:
        raise DataError(
            f"{stray[0]} is not in a class folder ({len(stray)} such image(s) in {root}): an "
            "image's folder is its class. Fix: move it into root/<class>/, or point task.root "
            "at the folder above the class folders.")

    def files_of(folder: Path, entries: list[os.DirEntry]) -> list[list[Any]]:
        out = []
        for e in entries:
            if _is_image(e, broken):
                _refuse_escape(real_root, e, root)
                st = e.stat()
                out.append([os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns])
        return out

    for entry in top:
        if not _is_dir(entry, broken):
            continue
        _refuse_escape(real_root, entry, root)
        inner = _visible(Path(entry.path))
        files = files_of(Path(entry.path), inner)
        if files:
            folders.append(_Folder(entry.name, "", Path(entry.path), files))
            continue
        for sub in inner:
            if not _is_dir(sub, broken):
                continue
            _refuse_escape(real_root, sub, root)
            files = files_of(Path(sub.path), _visible(Path(sub.path)))
            if files:
                folders.append(_Folder(f"{entry.name}/{sub.name}", entry.name, Path(sub.path),
                                       files))
    _warn_broken(sorted(set(broken)))
    if not folders:
        raise DataError(
            f"{root} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)}). "
            "Expected root/<class>/*.jpg or root/<group>/<class>/*.jpg; is task.root the right "
            "folder?")
    return folders


# ----------------------------------------------------------------------------------- splits


@dataclass
class _SplitSpec:
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


def parse_split(split: str, value: Any, root: Path) -> _SplitSpec:
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
        return _SplitSpec("fraction", where, fraction=float(value))
    if isinstance(value, str):
        path = find_split_file(value, root)
        if path.suffix.lower() == ".csv":
            return _SplitSpec("csv", str(path), path=path)
        entries = _read_lines(path)
        if not entries:
            raise DataError(f"Split file {path} names no classes.")
        return _SplitSpec("classes", str(path), entries=entries, path=path)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value) and value:
        return _SplitSpec("classes", where, entries=[str(v).strip() for v in value])
    raise SettingError(f"{where} must be a split file, a non-empty list of classes or a fraction, "
                     f"got {value!r}.")


def match_classes(spec: _SplitSpec, available: Mapping[str, str],
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
    return out


def _split_key(split: str, where: str) -> str:
    """``task.family.splits.<split>``, with the file it names when it names one."""
    key = f"task.family.splits.{split}"
    return key if where == f"splits.{split}" else f"{key} ({where})"


def _check_disjoint(chosen: Mapping[str, Mapping[str, str]], wheres: Mapping[str, str],
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


def _folder_ident(folder: _Folder) -> str:
    """A class folder's identity: its real path (a symbolic link inside the root, or the same
    folder named as ``group/class`` and as ``class``, is still the same class)."""
    return os.path.realpath(folder.path)


def _label_ident(label: str, folders: Mapping[str, _Folder] | None) -> str:
    """A CSV label's identity: the class folder of that name (or the one folder with that last
    part), so a CSV split and a class list naming the same class collide; else the label."""
    if folders:
        if label in folders:
            return _folder_ident(folders[label])
        leaves = [f for name, f in folders.items() if name.rsplit("/", 1)[-1] == label]
        if len(leaves) == 1:
            return _folder_ident(leaves[0])
    return label


def _image_idents(root: Path, items: Sequence[Sequence[Any]]) -> dict[str, str]:
    """Real path -> path under root of each image (``[relative path, size, mtime]`` items);
    folders are resolved once each, files only when they are links."""
    real_dirs: dict[str, str] = {}
    out = {}
    for rel, *_ in items:
        head, name = os.path.split(rel)
        if head not in real_dirs:
            real_dirs[head] = os.path.realpath(root / head)
        path = os.path.join(real_dirs[head], name)
        out[os.path.realpath(path) if os.path.islink(path) else path] = rel
    return out


def _fraction_split(pool: list[str], specs: Mapping[str, _SplitSpec],
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


# ------------------------------------------------------------------------------------ cache


def _npy_header(shape: Sequence[int], length: int | None = None) -> bytes:
    """An ``.npy`` (format 1.0) header for C-ordered uint8 of ``shape``, padded to ``length``
    bytes (default: the smallest multiple of 64), so it can be rewritten in place."""
    text = str({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    if length is None:
        length = 64 * math.ceil((len(_NPY_MAGIC) + 2 + len(text) + 1) / 64)
    pad = length - len(_NPY_MAGIC) - 2 - len(text) - 1
    if pad < 0:
        raise SettingError("npy header does not fit")
    body = (text + " " * pad + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(body)) + body


class _Progress:
    """"decoding 1200/10000 images (12%), 850/s" on stderr: rewritten in place on a
    terminal, a new line every ``every`` seconds elsewhere (logs, CI, SLURM)."""

    def __init__(self, total: int, what: str, every: float = 10.0) -> None:
        self.total, self.what, self.done = total, what, 0
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else every
        self.start = self.last = time.perf_counter()
        self._print(f"[sharebone] {what}: {total} images")

    def _print(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            line = (f"[sharebone] {self.what}: {self.done}/{self.total} images "
                    f"({100 * self.done / max(self.total, 1):.0f}%), {rate:.0f}/s")
            self._print(("\r" + line) if self.tty else line,
                        end="" if self.tty and self.done < self.total else "\n")


@dataclass
class _Plan:
    """How to make one split: its classes (with their items), its cache key and a decoder."""

    split: str
    classes: list[ClassEntry]
    key: dict[str, Any]
    decode: Callable[[Any], np.ndarray]  # item -> uint8 [C, S, S]
    describe: Callable[[Any], str]  # item -> where it is, for messages
    label: str  # cache file stem
    #: For sources read whole (pickles, archives): () -> (classes, pixel array); the items of
    #: the classes are then rows of that array. Called only when the cache misses.
    load: Callable[[], tuple[list[ClassEntry], Any]] | None = None


def _decode_chunk(plan: _Plan, chunk: list[tuple[int, Any]], shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, list[int], list[str]]:
    out = np.empty((len(chunk), *shape), np.uint8)
    kept, failed = [], []
    for cls, item in chunk:
        try:
            out[len(kept)] = plan.decode(item)
            kept.append(cls)
        except DECODE_ERRORS as e:
            failed.append(f"{plan.describe(item)} ({e})")
    return out[: len(kept)], kept, failed


@register_family("image_folder")
class ImageFolderTasks:
    """Classes of images from a folder (or a benchmark's own files) as few-shot tasks.

    Args:
        root: the data folder (see the module docstring for its layouts).
        splits: split name -> split (a class-list file, a ``.csv``, a list of classes, a
            fraction; null: no such split); default ``{train: 0.64, val: 0.16, test: 0.2}``
            of the classes.
        image_size, channels: the images' side and channels (1 or 3).
        resize: ``stretch`` (the whole image, squeezed to a square) or ``crop`` (centre).
        interpolation: resampling filter (``lanczos``, ``bicubic``, ``bilinear``, ...).
        invert: invert intensities (dark drawings on white become bright on black).
        source: ``folder``, ``mini_imagenet_pickle``, ``tiered_imagenet_pickle``,
            ``cifar100`` or ``auto``.
        cache_dir: where decoded splits are cached (None: ``$SHAREBONE_CACHE_DIR``, else
            ``~/.cache/sharebone``); ``false`` decodes into memory, without a cache.
        corrupt: an image that cannot be decoded: ``refuse`` (an error listing them) or
            ``skip`` (a warning listing them).
        workers: decoding threads (None: the CPUs this process may use).
        split_seed: seed of a random (fraction) split.
        group_episodes: draw every episode's classes from one group, in all splits (true) or
            in the splits listed.
        augment: split -> augmentation (:mod:`sharebone.data.augment`), applied on the device.
        normalize: ``{mean: [...], std: [...]}`` for every split.
        download: fetch a missing CIFAR-100 archive (``source: cifar100``).
    """

    def __init__(self, root: str, splits: Mapping[str, Any] | None = None, image_size: int = 84,
                 channels: int = 3, resize: str = "stretch", interpolation: str = "lanczos",
                 invert: bool = False, source: str = "folder",
                 cache_dir: str | bool | None = None, corrupt: str = "refuse",
                 workers: int | None = None, split_seed: int = 0,
                 group_episodes: bool | Sequence[str] = False,
                 augment: Mapping[str, Any] | None = None,
                 normalize: Mapping[str, Any] | None = None, download: bool = True) -> None:
        from sharebone.data.tasks import default_cache_dir, group_splits

        if not root or str(root) == "???":
            raise SettingError("task.root: the folder of images is not set; pass "
                               "task.root=/path/to/images.")
        check_decode_args(image_size, channels, resize, interpolation, keys={
            "image_size": "task.image_size", "channels": "task.channels",
            "resize": "task.family.resize", "interpolation": "task.family.interpolation"})
        if source not in SOURCES:
            raise SettingError(f"source must be one of {list(SOURCES)}, got {source!r}.")
        if corrupt not in CORRUPT_POLICIES:
            raise SettingError(f"corrupt must be one of {list(CORRUPT_POLICIES)}, got "
                               f"{corrupt!r}.")
        self.root = Path(root).expanduser()
        splits = {"train": 0.64, "val": 0.16, "test": 0.2} if splits is None else splits
        self.splits = {str(k): v for k, v in splits.items() if v is not None}  # null: no split
        if not self.splits:
            raise SettingError("splits: no split is set; give at least one, e.g. {test: 1.0}.")
        self.image_size, self.channels = image_size, channels
        self.resize, self.interpolation, self.invert = resize, interpolation, bool(invert)
        self.source, self.corrupt, self.download = source, corrupt, download
        self.workers = workers or len(os.sched_getaffinity(0))
        self.split_seed = int(split_seed)
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.group_splits = group_splits(group_episodes, self.splits)
        self.augment = {str(s): check_augment(a, f"augment.{s}")
                        for s, a in (augment or {}).items() if a}
        self.normalize = check_normalize(normalize, channels)
        unknown = sorted(set(self.augment) - set(self.splits))
        if unknown:
            raise SettingError(f"augment names split(s) {unknown}; this task has "
                               f"{sorted(self.splits)}.")
        self.input_shape = (channels, image_size, image_size)
        self._loaded: dict[str, ImageSet] = {}
        self._where: dict[str, list[str]] = {}
        self._resolved: dict[str, list[ClassEntry]] | None = None
        self._source: str | None = None

    # ------------------------------------------------------------------ public interface

    @classmethod
    def preprocessing(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """How a task of this family reads one image file (``invert``, ``resize``,
        ``interpolation``) and normalises it (``normalize``), from its config's family block:
        for a user's own episode folder (``sharebone-eval episode_dir=...``)."""
        channels = int(config.get("channels", 3))
        return {"invert": bool(config.get("invert", False)),
                "resize": config.get("resize", "stretch"),
                "interpolation": config.get("interpolation", "lanczos"),
                "normalize": check_normalize(config.get("normalize"), channels)}

    def images(self, split: str) -> ImageSet:
        """The split's images (memory-mapped from the cache), decoded once per machine."""
        if split not in self.splits:
            raise UnknownNameError(f"Unknown split '{split}'. This task family has: "
                           f"{sorted(self.splits)}.")
        if split not in self._loaded:
            self._loaded[split], self._where[split] = self._load(split)
        return self._loaded[split]

    def input_transform(self, split: str, seed: int) -> EpisodeTransform | None:
        """What turns the split's uint8 batches into model input (None: pixels / 255)."""
        transform = EpisodeTransform(seed, split, self.augment.get(split), self.normalize)
        return transform if transform else None

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> EpisodeSampler:
        data = self.images(split)
        per_way = int(k_shot) + int(q_query) if all(
            isinstance(v, int) for v in (k_shot, q_query)) else None
        if per_way is not None:
            self._check_class_sizes(split, data, per_way, k_shot, q_query)
        return EpisodeSampler(data.images, data.labels, n_way, k_shot, q_query, seed=seed,
                              split=split, groups=data.class_groups,
                              group_episodes=self._group_check(split, data),
                              transform=self.input_transform(split, seed))

    def _group_check(self, split: str, data: ImageSet) -> bool:
        if split not in self.group_splits:
            return False
        if not any(data.class_groups):
            raise SettingError(
                f"group_episodes: the classes of split '{split}' have no groups; give them a "
                "<group>/<class> folder level or <group>/<class> lines in the split file.")
        return True

    def _check_class_sizes(self, split: str, data: ImageSet, per_way: int, k_shot: int,
                           q_query: int) -> None:
        counts = data.class_counts.tolist()
        small = [(self._where[split][c], n) for c, n in enumerate(counts) if n < per_way]
        if small:
            shown = "; ".join(f"{w} has {n}" for w, n in small[:5])
            more = f" (and {len(small) - 5} more)" if len(small) > 5 else ""
            raise SettingError(
                f"k_shot + q_query = {k_shot} + {q_query} = {per_way} images per class, but "
                f"{len(small)} class(es) of split '{split}' have fewer: {shown}{more}. Lower "
                f"k_shot or q_query, add images, or leave those classes out of the split.")

    # --------------------------------------------------------------------------- sources

    def _settings(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "image_size": self.image_size,
                "channels": self.channels, "resize": self.resize,
                "interpolation": self.interpolation, "invert": self.invert,
                "corrupt": self.corrupt}

    def _decode_file(self, item: list[Any]) -> np.ndarray:
        array = decode_array(self.root / item[0], self.image_size, self.channels, self.invert,
                               self.resize, self.interpolation)
        return to_chw(array)

    def _decode_pixels(self, array: np.ndarray) -> np.ndarray:
        """An HWC (or HW) uint8 array from a pickle or archive, converted and resized."""
        if array.shape[:2] == (self.image_size, self.image_size) and not self.invert and (
                (array.ndim == 3 and array.shape[2] == self.channels)
                or (array.ndim == 2 and self.channels == 1)):
            return to_chw(array)
        return to_chw(decode_array(np.ascontiguousarray(array), self.image_size, self.channels,
                                   self.invert, self.resize, self.interpolation))

    def resolved_source(self) -> str:
        """``source``, with ``auto`` resolved by what ``root`` holds."""
        if self._source is None:
            source = self.source
            if source == "auto":
                check_root(self.root)
                pickles = [self.root / MINI_IMAGENET_PICKLE.format(split=s) for s in self.splits]
                csvs = [self.root / f"{s}.csv" for s in self.splits]
                tiered = [self.root / name.format(split=s) for s in self.splits
                          for name in (TIERED_IMAGES, TIERED_LABELS)]
                if all(p.is_file() for p in pickles):
                    source = "mini_imagenet_pickle"
                elif all(p.is_file() for p in tiered):
                    source = "tiered_imagenet_pickle"
                else:
                    source = "folder"
                    if all(p.is_file() for p in csvs):  # Ravi & Larochelle's layout
                        self.splits = {s: str(p) for s, p in zip(self.splits, csvs, strict=True)}
                log.info("task.root %s: reading it as %s", self.root, source)
            self._source = source
        return self._source

    def _plan(self, split: str) -> _Plan:
        source = self.resolved_source()
        if source == "mini_imagenet_pickle":
            return self._plan_pickle(split)
        if source == "tiered_imagenet_pickle":
            return self._plan_tiered(split)
        if source == "cifar100":
            return self._plan_cifar(split)
        classes = self._folder_classes()[split]
        key = {**self._settings(), "source": "folder", "root": os.path.realpath(self.root),
               "classes": [[c.name, c.group, c.items] for c in classes]}
        return _Plan(split, classes, key, self._decode_file,
                     lambda item: str(self.root / item[0]), self.root.name)

    def _folder_classes(self) -> dict[str, list[ClassEntry]]:
        """Every split's classes, matched against the folder, checked disjoint (by class and
        by image, across all split forms)."""
        if self._resolved is not None:
            return self._resolved
        root = check_root(self.root)
        specs = {s: parse_split(s, v, root) for s, v in self.splits.items()}
        folders = None
        if any(spec.kind != "csv" for spec in specs.values()):
            folders = {f.name: f for f in scan_classes(root)}
        chosen: dict[str, list[ClassEntry]] = {}
        for split, spec in specs.items():
            if spec.kind == "classes":
                matched = match_classes(spec, {n: f.group for n, f in folders.items()},
                                        f"{root}")
                chosen[split] = [self._folder_entry(folders[name], entry, group)
                                 for entry, name, group in matched]
            elif spec.kind == "csv":
                chosen[split] = self._csv_classes(spec, root, folders)
        wheres = {s: specs[s].where for s in specs}
        _check_disjoint({s: {c.ident: c.name for c in cs} for s, cs in chosen.items()}, wheres)
        fractions = {s: spec for s, spec in specs.items() if spec.kind == "fraction"}
        if fractions:
            taken = {c.ident for cs in chosen.values() for c in cs}
            taken_images = {i for cs in chosen.values() for c in cs
                            for i in _image_idents(root, c.items)}
            pool = [n for n, f in folders.items() if _folder_ident(f) not in taken
                    and taken_images.isdisjoint(_image_idents(root, f.files))]
            for split, names in _fraction_split(pool, fractions, self.split_seed).items():
                chosen[split] = [self._folder_entry(folders[n], n, folders[n].group)
                                 for n in names]
        _check_disjoint({s: {i: f"{rel} ({c.name})" for c in cs
                             for i, rel in _image_idents(root, c.items).items()}
                         for s, cs in chosen.items()}, wheres, "image(s)")
        self._resolved = {s: sorted(chosen[s], key=lambda c: c.name) for s in self.splits}
        return self._resolved

    @staticmethod
    def _folder_entry(folder: _Folder, name: str, group: str) -> ClassEntry:
        return ClassEntry(name, group, str(folder.path), folder.files, _folder_ident(folder))

    def _csv_classes(self, spec: _SplitSpec, root: Path,
                     folders: Mapping[str, _Folder] | None = None) -> list[ClassEntry]:
        """Ravi & Larochelle's ``filename,label`` rows as classes of files (a label that names
        a class folder is that class, for the splits' disjointness)."""
        try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the header
            text = spec.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"Split file {spec.path} is not UTF-8 text ({e}).") from e
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
            rows = rows[1:]
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
                    if not _inside(real_root, str(candidate)):
                        _refuse_escape(real_root, candidate, root)
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
                          stacklevel=4)
        return [ClassEntry(label, "", f"class {label} of {spec.path}", sorted(files),
                           _label_ident(label, folders)) for label, files in by_label.items()]

    def _plan_pickle(self, split: str) -> _Plan:
        path = self.root / MINI_IMAGENET_PICKLE.format(split=split)
        if not path.exists():
            raise DataNotFoundError(
                f"{path.name} is missing from {self.root} (source: mini_imagenet_pickle reads "
                f"{MINI_IMAGENET_PICKLE.format(split='<split>')} for every split). Fix: put it "
                "there, or use source=folder with the images.")
        require_regular_file(path)
        st = path.stat()
        key = {**self._settings(), "source": "mini_imagenet_pickle", "file": str(path.resolve()),
               "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return _Plan(split, [], key, self._decode_pixels, lambda item: f"row {item} of {path}",
                     f"{self.root.name}-pickle", lambda: self._read_mini_pickle(path, split))

    def _read_mini_pickle(self, path: Path, split: str) -> tuple[list[ClassEntry], Any]:
        with open(path, "rb") as f:
            obj = load_data_pickle(f.read(), str(path))
        fix = " Fix: replace it with the published mini-imagenet-cache file."
        if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= set(obj):
            raise DataError(f"{path} is not a miniImageNet cache (a dict with image_data and "
                            f"class_dict).{fix}")
        images, classes = obj["image_data"], obj["class_dict"]
        if (not isinstance(images, np.ndarray) or images.dtype != np.uint8
                or images.ndim != 4 or images.shape[3] != 3):
            raise DataError(f"{path}: image_data is not a uint8 [N, H, W, 3] array.{fix}")
        if not isinstance(classes, dict) or not classes:
            raise DataError(f"{path}: class_dict is not a dict of class -> image indices.{fix}")
        entries = []
        for name in sorted(classes):
            rows = classes[name]
            if (not isinstance(name, str) or not isinstance(rows, list | tuple | np.ndarray)
                    or not len(rows) or not all(
                        isinstance(r, int | np.integer) and 0 <= r < len(images) for r in rows)):
                raise DataError(f"{path}: class {name!r} does not list image indices in "
                                f"0..{len(images) - 1}.{fix}")
            entries.append(ClassEntry(name, "", f"class {name} of {path}",
                                      [int(r) for r in rows]))
        self._check_listed(split, [e.name for e in entries], str(path))
        return entries, images

    def _plan_tiered(self, split: str) -> _Plan:
        files = release_files(self.root, split)
        for path in files:
            require_regular_file(path)
        names = find_split_file(NAMES_FILE, self.root)
        stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                 for p in (*files, names)]  # the names table names the cached classes too
        key = {**self._settings(), "source": "tiered_imagenet_pickle", "files": stats,
               "listed": sorted(self._listed(split).values())}
        return _Plan(split, [], key, self._decode_png, lambda item: f"image {item} of {files[0]}",
                     f"{self.root.name}-release", lambda: self._read_tiered(split, names))

    def _listed(self, split: str) -> dict[str, str]:
        """Class -> its line in the split's class list (``<category>/<wnid>``), if it has one."""
        spec = self.splits.get(split)
        if not isinstance(spec, str) or spec.lower().endswith(".csv"):
            return {}
        return {e.rpartition("/")[2]: e for e in parse_split(split, spec, self.root).entries}

    def _decode_png(self, item: Any) -> np.ndarray:
        return to_chw(decode_array(png_bytes(item), self.image_size, self.channels, self.invert,
                                   self.resize, self.interpolation))

    def _read_tiered(self, split: str, names: Path) -> tuple[list[ClassEntry], Any]:
        release = read_release(self.root, split, read_names(names))
        self._check_listed(split, [c.name for c in release.classes],
                           str(release_files(self.root, split)[1]))
        # Named as the class list names them (<category>/<wnid>), as the folder source does.
        listed = self._listed(split)
        entries = [ClassEntry(listed.get(c.name, f"{c.group}/{c.name}"), c.group, c.where,
                              c.rows, c.name) for c in release.classes]
        return sorted(entries, key=lambda e: e.name), release.images

    def _check_listed(self, split: str, names: list[str], where: str) -> None:
        """A pickle's classes must be the configured class list's, when there is one."""
        spec = self.splits.get(split)
        if not isinstance(spec, str) or spec.lower().endswith(".csv"):
            return
        listed = parse_split(split, spec, self.root)
        wanted = {e.rpartition("/")[2] for e in listed.entries}
        if wanted != set(names):
            extra, absent = sorted(set(names) - wanted), sorted(wanted - set(names))
            raise DataError(
                f"{where} holds other classes than {listed.where} lists for split '{split}' "
                f"(not listed: {extra[:5]}; missing: {absent[:5]}). Is it another split's "
                "file?")

    def _cifar_specs(self) -> dict[str, _SplitSpec]:
        specs = {s: parse_split(s, v, self.root) for s, v in self.splits.items()}
        for split, spec in specs.items():
            if spec.kind == "csv":
                raise SettingError(f"splits.{split}: CSV splits name image files; source cifar100 "
                                 "takes class lists or fractions.")
        return specs

    def _plan_cifar(self, split: str) -> _Plan:
        specs = self._cifar_specs()
        spec = specs[split]
        key = {**self._settings(), "source": "cifar100", "md5": CIFAR100.md5,
               "split": spec.entries if spec.kind == "classes" else
               {"fractions": {s: v.fraction for s, v in specs.items()}, "split": split,
                "listed": sorted(e for v in specs.values() for e in v.entries),
                "seed": self.split_seed}}
        archive = self.root / CIFAR100.filename
        return _Plan(split, [], key, self._decode_pixels,
                     lambda item: f"image {item} of {archive}", "cifar100",
                     lambda: self._read_cifar(split, specs))

    def _read_cifar(self, split: str, specs: Mapping[str, _SplitSpec]
                    ) -> tuple[list[ClassEntry], Any]:
        (archive,) = ensure_archives([CIFAR100], self.root, download=self.download)
        top = "cifar-100-python"
        members = read_tar_members(archive, [f"{top}/train", f"{top}/test", f"{top}/meta"],
                                   CIFAR_MAX_MEMBER_BYTES)

        def unpickle(name: str) -> dict[str, Any]:
            obj = load_data_pickle(members[f"{top}/{name}"], f"{archive} member {top}/{name}",
                                   encoding="bytes")
            if not isinstance(obj, dict):
                raise DataError(f"{archive}: {top}/{name} is not a dict; not CIFAR-100.")
            return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}

        meta = unpickle("meta")
        fine = [n.decode() if isinstance(n, bytes) else n for n in meta["fine_label_names"]]
        coarse = [n.decode() if isinstance(n, bytes) else n for n in meta["coarse_label_names"]]
        parts = [unpickle("train"), unpickle("test")]
        data = np.concatenate([np.asarray(p["data"], np.uint8) for p in parts])
        fine_labels = np.concatenate([np.asarray(p["fine_labels"]) for p in parts])
        coarse_labels = np.concatenate([np.asarray(p["coarse_labels"]) for p in parts])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(fine_labels) != len(data):
            raise DataError(f"{archive}: the batches are not [N, 3072] pixels; not CIFAR-100.")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as decode expects
        group_of = {fine[f]: coarse[c] for f, c in zip(fine_labels, coarse_labels, strict=True)}
        matched = {s: match_classes(v, group_of, f"CIFAR-100 ({archive})")
                   for s, v in specs.items() if v.kind == "classes"}
        _check_disjoint({s: {name: name for _, name, _ in m} for s, m in matched.items()},
                        {s: v.where for s, v in specs.items()})
        if specs[split].kind == "fraction":
            fractions = {s: v for s, v in specs.items() if v.kind == "fraction"}
            listed = {name for m in matched.values() for _, name, _ in m}
            pool = [n for n in fine if n not in listed]
            chosen = [(n, n, group_of[n]) for n in
                      _fraction_split(pool, fractions, self.split_seed)[split]]
        else:
            chosen = matched[split]
        entries = []
        for entry, name, group in sorted(chosen):
            rows = np.nonzero(fine_labels == fine.index(name))[0].tolist()
            entries.append(ClassEntry(entry, group, f"CIFAR-100 class {name} in {archive}",
                                      rows))
        return entries, images

    # ----------------------------------------------------------------------- the cache

    def _cache_files(self, plan: _Plan) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps(plan.key, sort_keys=True).encode()).hexdigest()
        plan.key["digest"] = digest
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.label)[:40] or "images"
        base = self.cache_dir / CACHE_SUBDIR / f"{stem}-{plan.split}-{digest[:20]}"
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def _read_cache(self, files: tuple[Path, Path], plan: _Plan
                    ) -> tuple[ImageSet, list[str]] | None:
        npy, meta_file = files
        for path in files:
            try:
                mode = path.stat().st_mode
            except OSError:
                return None
            if not stat.S_ISREG(mode):
                log.warning("Cache entry %s is not a regular file; ignoring it (remove it to "
                            "let the cache work again).", path)
                return None
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT_VERSION or meta.get("digest") != plan.key["digest"]:
                raise SettingError("written with other settings")
            names, groups, counts = meta["class_names"], meta["groups"], meta["counts"]
            shape = tuple(meta["shape"])
            if shape[1:] != self.input_shape or sum(counts) != shape[0] or not (
                    len(names) == len(groups) == len(counts) == len(meta["where"])):
                raise SettingError("its record does not match its settings")
            st = npy.stat()
            if [st.st_size, st.st_mtime_ns] != [meta["npy"]["size"], meta["npy"]["mtime_ns"]]:
                raise SettingError("the file changed after it was written")
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
            if array.dtype != np.uint8 or array.shape != shape or not array.flags.c_contiguous:
                raise SettingError(f"it holds {array.dtype} {array.shape}, its record says "
                                 f"uint8 {shape}")
            with warnings.catch_warnings():  # read-only: the sampler only reads rows
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                images = torch.from_numpy(array)
            labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
            return ImageSet(images, labels, names, groups), meta["where"]
        except Exception as e:  # any failure at all means: do not trust this file
            log.warning("Cache %s is unusable (%s); rebuilding it.", npy, e)
            return None

    def _load(self, split: str) -> tuple[ImageSet, list[str]]:
        plan = self._plan(split)
        files = self._cache_files(plan)
        if files is not None:
            cached = self._read_cache(files, plan)
            if cached is not None:
                return cached
        if plan.load is not None:
            plan.classes, arrays = plan.load()
            decode_pixels = plan.decode
            plan.decode = lambda row: decode_pixels(arrays[row])
        if files is not None and all(not p.exists() or p.is_file() for p in files):
            try:
                self._build(plan, files)
            except OSError as e:  # a read-only or full cache folder must not stop a run
                log.warning("Cannot write the cache %s (%s); decoding into memory instead.",
                            files[0], e)
            else:
                cached = self._read_cache(files, plan)
                if cached is None:
                    raise DataError(f"The cache {files[0]} just written cannot be read back.")
                return cached
        images, counts, where, skipped = self._decode_all(plan, None)
        labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
        return ImageSet(torch.from_numpy(images), labels, [c.name for c in plan.classes],
                        [c.group for c in plan.classes]), where

    def _build(self, plan: _Plan, files: tuple[Path, Path]) -> None:
        npy, meta_file = files
        with atomic_write(npy) as f:
            images, counts, where, skipped = self._decode_all(plan, f)
        st = npy.stat()
        meta = {"format": FORMAT_VERSION, "digest": plan.key["digest"], "split": plan.split,
                "npy": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
                "shape": [sum(counts), *self.input_shape],
                "class_names": [c.name for c in plan.classes],
                "groups": [c.group for c in plan.classes], "counts": counts, "where": where,
                "skipped": skipped, "settings": self._settings()}
        with atomic_write(meta_file, "w") as f:
            json.dump(meta, f)
        log.info("Cached split '%s' (%d images, %.1f MB) in %s", plan.split, sum(counts),
                 npy.stat().st_size / 1e6, npy)

    def _decode_all(self, plan: _Plan, out: Any) -> tuple[np.ndarray | None, list[int],
                                                          list[str], list[str]]:
        """Decode every image of ``plan`` in order, into the file ``out`` (an ``.npy``) or,
        when it is None, into an array; returns (array or None, counts, where, skipped)."""
        items = [(c, item) for c, entry in enumerate(plan.classes) for item in entry.items]
        shape = self.input_shape
        if out is not None:
            header = _npy_header((len(items), *shape))
            out.write(header)
            array = None
        else:
            array = np.empty((len(items), *shape), np.uint8)
        counts = [0] * len(plan.classes)
        failed: list[str] = []
        written = 0
        chunk = 64
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        progress = _Progress(len(items), f"decoding split '{plan.split}' of {self.root}")
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            results = pool.map(lambda c: _decode_chunk(plan, c, shape), chunks)
            try:
                for decoded, kept, bad in results:
                    failed += bad
                    if bad and self.corrupt == "refuse":
                        raise DataError(self._corrupt_message(failed))
                    for c in kept:
                        counts[c] += 1
                    if out is not None:
                        out.write(decoded.tobytes())
                    else:
                        array[written:written + len(kept)] = decoded
                    written += len(kept)
                    progress.update(len(kept) + len(bad))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        empty = [plan.classes[c].where for c, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(f"No image of {', '.join(empty[:5])} could be decoded "
                            f"({len(failed)} unreadable image(s), e.g. {failed[0]}).")
        if failed:
            warnings.warn(f"Skipped {len(failed)} image(s) that cannot be decoded "
                          f"(corrupt: skip): {'; '.join(failed[:10])}"
                          + (f" and {len(failed) - 10} more" if len(failed) > 10 else ""),
                          stacklevel=3)
        if out is not None and written != len(items):
            out.seek(0)
            out.write(_npy_header((written, *shape), len(header)))
        where = [c.where for c in plan.classes]
        return (None if array is None else array[:written]), counts, where, failed

    def _corrupt_message(self, failed: list[str]) -> str:
        return (f"Cannot decode {len(failed)} image(s): {'; '.join(failed[:10])}. Fix: remove "
                "or re-save them, or set task.family.corrupt=skip to leave them out (with a "
                "warning). Nothing was cached.")

    def __repr__(self) -> str:
        return (f"ImageFolderTasks(root={str(self.root)!r}, source={self.source!r}, "
                f"splits={sorted(self.splits)}, input_shape={self.input_shape})")
