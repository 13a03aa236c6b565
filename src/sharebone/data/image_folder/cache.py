"""Decoding a split once into a memory-mapped uint8 ``.npy`` cache, and reading it back.

Each split is decoded in parallel (``workers`` threads; Pillow decodes and resizes without the
GIL) into ``<cache_dir>/image_folder/<label>-<split>-<digest>.npy``, uint8 ``[N, C, S, S]``,
written atomically beside a JSON record (classes, counts, where they came from, the images
skipped), and opened memory-mapped. The digest hashes a :class:`Plan`'s key: everything that
changes the cache's contents (the files with their sizes and mtimes, the decoding settings,
:data:`FORMAT_VERSION`). The header and the record are checked on every read; a file that
does not match is rebuilt, never trusted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import re
import stat
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharebone.data.archives import DataError
from sharebone.data.image_folder.classes import ClassEntry
from sharebone.data.images import DECODE_ERRORS, ImageSet, decode_array, to_chw
from sharebone.errors import SettingError
from sharebone.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["CACHE_SUBDIR", "FORMAT_VERSION", "Decoding", "Plan", "SplitCache"]

#: Bumped whenever the cache's contents would change for the same settings.
FORMAT_VERSION = 1
CACHE_SUBDIR = "image_folder"
CORRUPT_POLICIES = ("refuse", "skip")

_NPY_MAGIC = b"\x93NUMPY\x01\x00"


@dataclass(frozen=True)
class Decoding:
    """How a family reads every image: side, channels, resizing, filter, inversion, and what
    it does with an image that cannot be decoded (``corrupt``)."""

    image_size: int
    channels: int
    resize: str
    interpolation: str
    invert: bool
    corrupt: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def settings(self) -> dict[str, Any]:
        """What the cache's contents depend on (in its key and its record)."""
        return {"format": FORMAT_VERSION, "image_size": self.image_size,
                "channels": self.channels, "resize": self.resize,
                "interpolation": self.interpolation, "invert": self.invert,
                "corrupt": self.corrupt}

    def decode(self, source: Any) -> np.ndarray:
        """An image file (a path) or its bytes, as uint8 ``[C, S, S]``."""
        return to_chw(decode_array(source, self.image_size, self.channels, self.invert,
                                   self.resize, self.interpolation))

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """An HWC (or HW) uint8 array from a pickle or archive, converted and resized."""
        if array.shape[:2] == (self.image_size, self.image_size) and not self.invert and (
                (array.ndim == 3 and array.shape[2] == self.channels)
                or (array.ndim == 2 and self.channels == 1)):
            return to_chw(array)
        return to_chw(decode_array(np.ascontiguousarray(array), self.image_size, self.channels,
                                   self.invert, self.resize, self.interpolation))


@dataclass
class Plan:
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


def _decode_chunk(plan: Plan, chunk: list[tuple[int, Any]], shape: tuple[int, ...]
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


def _corrupt_message(failed: list[str]) -> str:
    return (f"Cannot decode {len(failed)} image(s): {'; '.join(failed[:10])}. Fix: remove "
            "or re-save them, or set task.family.corrupt=skip to leave them out (with a "
            "warning). Nothing was cached.")


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))


@dataclass
class SplitCache:
    """Where a family's decoded splits are cached (``directory`` None: no cache), and how
    they are decoded (``decoding``, ``workers`` threads; ``root`` names the data in
    progress lines)."""

    directory: Path | None
    decoding: Decoding
    workers: int
    root: Path

    def load(self, plan: Plan) -> tuple[ImageSet, list[str]]:
        """The split ``plan`` makes, and where each of its classes came from: from the cache
        when it holds it, else decoded (into the cache when it can be written)."""
        files = self._files(plan)
        if files is not None:
            cached = self._read(files, plan)
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
                cached = self._read(files, plan)
                if cached is None:
                    raise DataError(f"The cache {files[0]} just written cannot be read back.")
                return cached
        images, counts, where, skipped = self._decode_all(plan, None)
        return ImageSet(torch.from_numpy(images), _labels(counts),
                        [c.name for c in plan.classes], [c.group for c in plan.classes]), where

    def _files(self, plan: Plan) -> tuple[Path, Path] | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(json.dumps(plan.key, sort_keys=True).encode()).hexdigest()
        plan.key["digest"] = digest
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.label)[:40] or "images"
        base = self.directory / CACHE_SUBDIR / f"{stem}-{plan.split}-{digest[:20]}"
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def _read(self, files: tuple[Path, Path], plan: Plan) -> tuple[ImageSet, list[str]] | None:
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
            if shape[1:] != self.decoding.input_shape or sum(counts) != shape[0] or not (
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
            return ImageSet(images, _labels(counts), names, groups), meta["where"]
        except Exception as e:  # any failure at all means: do not trust this file
            log.warning("Cache %s is unusable (%s); rebuilding it.", npy, e)
            return None

    def _build(self, plan: Plan, files: tuple[Path, Path]) -> None:
        npy, meta_file = files
        with atomic_write(npy) as f:
            images, counts, where, skipped = self._decode_all(plan, f)
        st = npy.stat()
        meta = {"format": FORMAT_VERSION, "digest": plan.key["digest"], "split": plan.split,
                "npy": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
                "shape": [sum(counts), *self.decoding.input_shape],
                "class_names": [c.name for c in plan.classes],
                "groups": [c.group for c in plan.classes], "counts": counts, "where": where,
                "skipped": skipped, "settings": self.decoding.settings()}
        with atomic_write(meta_file, "w") as f:
            json.dump(meta, f)
        log.info("Cached split '%s' (%d images, %.1f MB) in %s", plan.split, sum(counts),
                 npy.stat().st_size / 1e6, npy)

    def _decode_all(self, plan: Plan, out: Any) -> tuple[np.ndarray | None, list[int],
                                                         list[str], list[str]]:
        """Decode every image of ``plan`` in order, into the file ``out`` (an ``.npy``) or,
        when it is None, into an array; returns (array or None, counts, where, skipped)."""
        items = [(c, item) for c, entry in enumerate(plan.classes) for item in entry.items]
        shape = self.decoding.input_shape
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
                    if bad and self.decoding.corrupt == "refuse":
                        raise DataError(_corrupt_message(failed))
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
        _check_decoded(plan, counts, failed)
        if out is not None and written != len(items):
            out.seek(0)
            out.write(_npy_header((written, *shape), len(header)))
        where = [c.where for c in plan.classes]
        return (None if array is None else array[:written]), counts, where, failed


def _check_decoded(plan: Plan, counts: list[int], failed: list[str]) -> None:
    """Refuse a class none of whose images decoded; warn of the images skipped."""
    empty = [plan.classes[c].where for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"No image of {', '.join(empty[:5])} could be decoded "
                        f"({len(failed)} unreadable image(s), e.g. {failed[0]}).")
    if failed:
        warnings.warn(f"Skipped {len(failed)} image(s) that cannot be decoded "
                      f"(corrupt: skip): {'; '.join(failed[:10])}"
                      + (f" and {len(failed) - 10} more" if len(failed) > 10 else ""),
                      stacklevel=4)
