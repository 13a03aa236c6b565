"""Where an image family's pixels come from: a folder, or a benchmark's own distribution form.

``folder`` (class folders, :mod:`~sharebone.data.image_folder.classes`),
``mini_imagenet_pickle`` (``root/mini-imagenet-cache-<split>.pkl``, dicts of ``image_data``
[N, 84, 84, 3] uint8 and ``class_dict`` name -> indices), ``tiered_imagenet_pickle`` (Ren et
al.'s release, :mod:`~sharebone.data.image_folder.tiered_release`), ``cifar100``
(``root/cifar-100-python.tar.gz``, downloaded and md5-checked when missing) or ``auto``
(resolved by what ``root`` holds), or one of Meta-Dataset's releases (``aircraft``,
``vgg_flower``, ``fungi``, ``quickdraw``, ``traffic_sign``, ``mscoco``:
:mod:`~sharebone.data.image_folder.md_releases`). Each source makes a
:class:`~.cache.Plan` per split: its classes, its cache key and how to decode one of its
items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sharebone.data.archives import (
    ArchiveSpec,
    DataError,
    DataNotFoundError,
    ensure_archives,
    load_data_pickle,
    read_tar_members,
    require_regular_file,
)
from sharebone.data.image_folder.cache import Decoding, Plan
from sharebone.data.image_folder.classes import ClassEntry, check_root
from sharebone.data.image_folder.md_releases import (
    MD_RELEASES,
    Release,
    read_md_release,
    release_splits,
)
from sharebone.data.image_folder.splits import (
    SplitSpec,
    check_disjoint,
    check_listed,
    find_split_file,
    folder_splits,
    fraction_split,
    listed,
    match_classes,
    parse_split,
)
from sharebone.data.image_folder.tiered_release import IMAGES_FILE as TIERED_IMAGES
from sharebone.data.image_folder.tiered_release import LABELS_FILE as TIERED_LABELS
from sharebone.data.image_folder.tiered_release import (
    NAMES_FILE,
    png_bytes,
    read_names,
    read_release,
    release_files,
)
from sharebone.errors import SettingError

log = logging.getLogger(__name__)

__all__ = ["CIFAR100", "MINI_IMAGENET_PICKLE", "SOURCES", "Sources"]

SOURCES = ("folder", "mini_imagenet_pickle", "tiered_imagenet_pickle", "cifar100",
           *MD_RELEASES, "auto")
MINI_IMAGENET_PICKLE = "mini-imagenet-cache-{split}.pkl"

#: The CIFAR-100 python archive (Krizhevsky 2009), as torchvision's ``CIFAR100`` checks it.
CIFAR100 = ArchiveSpec(name="cifar-100-python",
                       url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       md5="eb9058c3a382ffc7106e4002c42a8d85",
                       filename="cifar-100-python.tar.gz")
#: CIFAR-100's training batch is 150 MiB; nothing in the archive may be larger than this.
CIFAR_MAX_MEMBER_BYTES = 256 << 20


class Sources:
    """One family's ``source`` read from ``root``, split by ``splits`` (``auto`` resolved on
    first use; a folder's split classes matched once)."""

    def __init__(self, root: Path, splits: dict[str, Any], source: str, split_seed: int,
                 download: bool, decoding: Decoding,
                 release_options: Mapping[str, Any] | None = None) -> None:
        self.root, self.splits, self.source = root, splits, source
        self.split_seed, self.download, self.decoding = split_seed, download, decoding
        self.release_options = dict(release_options or {})
        self._resolved: dict[str, list[ClassEntry]] | None = None
        self._source: str | None = None
        self._release: tuple[Release, dict[str, list[ClassEntry]]] | None = None

    def resolved(self) -> str:
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

    def plan(self, split: str) -> Plan:
        """How to make split ``split`` from this source."""
        source = self.resolved()
        if source == "mini_imagenet_pickle":
            return self._plan_pickle(split)
        if source == "tiered_imagenet_pickle":
            return self._plan_tiered(split)
        if source == "cifar100":
            return self._plan_cifar(split)
        if source in MD_RELEASES:
            return self._plan_release(split)
        classes = self.folder_classes()[split]
        key = {**self.decoding.settings(), "source": "folder",
               "root": os.path.realpath(self.root),
               "classes": [[c.name, c.group, c.items] for c in classes]}
        return Plan(split, classes, key, self._decode_file,
                    lambda item: str(self.root / item[0]), self.root.name)

    def folder_classes(self) -> dict[str, list[ClassEntry]]:
        """Every split's classes in the folder (:func:`~.splits.folder_splits`), once."""
        if self._resolved is None:
            self._resolved = folder_splits(self.root, self.splits, self.split_seed)
        return self._resolved

    def _decode_file(self, item: list[Any]) -> np.ndarray:
        return self.decoding.decode(self.root / item[0])

    def _decode_png(self, item: Any) -> np.ndarray:
        return self.decoding.decode(png_bytes(item))

    # ------------------------------------------------------- Meta-Dataset's releases

    def release(self) -> tuple[Release, dict[str, list[ClassEntry]]]:
        """The release's classes and every split's (read once, before any decoding)."""
        if self._release is None:
            release = read_md_release(self.source, self.root, self.decoding, self.splits,
                                      self.release_options)
            self._release = release, release_splits(release, self.splits, self.root,
                                                    self.split_seed, self.source)
        return self._release

    def _plan_release(self, split: str) -> Plan:
        release, classes = self.release()
        key = {**self.decoding.settings(), "source": self.source,
               "root": os.path.realpath(self.root), **release.key,
               "classes": [[c.name, c.items] for c in classes[split]]}
        return Plan(split, classes[split], key, release.decode, release.describe,
                    f"{self.source}-{self.root.name}")

    # ------------------------------------------------------------------ miniImageNet

    def _plan_pickle(self, split: str) -> Plan:
        path = self.root / MINI_IMAGENET_PICKLE.format(split=split)
        if not path.exists():
            raise DataNotFoundError(
                f"{path.name} is missing from {self.root} (source: mini_imagenet_pickle reads "
                f"{MINI_IMAGENET_PICKLE.format(split='<split>')} for every split). Fix: put it "
                "there, or use source=folder with the images.")
        require_regular_file(path)
        st = path.stat()
        key = {**self.decoding.settings(), "source": "mini_imagenet_pickle",
               "file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return Plan(split, [], key, self.decoding.pixels, lambda item: f"row {item} of {path}",
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
        check_listed(split, self.splits.get(split), self.root, [e.name for e in entries],
                     str(path))
        return entries, images

    # ---------------------------------------------------------------- tieredImageNet

    def _plan_tiered(self, split: str) -> Plan:
        files = release_files(self.root, split)
        for path in files:
            require_regular_file(path)
        names = find_split_file(NAMES_FILE, self.root)
        stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                 for p in (*files, names)]  # the names table names the cached classes too
        key = {**self.decoding.settings(), "source": "tiered_imagenet_pickle", "files": stats,
               "listed": sorted(self._listed(split).values())}
        return Plan(split, [], key, self._decode_png, lambda item: f"image {item} of {files[0]}",
                    f"{self.root.name}-release", lambda: self._read_tiered(split, names))

    def _listed(self, split: str) -> dict[str, str]:
        return listed(split, self.splits.get(split), self.root)

    def _read_tiered(self, split: str, names: Path) -> tuple[list[ClassEntry], Any]:
        release = read_release(self.root, split, read_names(names))
        check_listed(split, self.splits.get(split), self.root,
                     [c.name for c in release.classes], str(release_files(self.root, split)[1]))
        # Named as the class list names them (<category>/<wnid>), as the folder source does.
        lines = self._listed(split)
        entries = [ClassEntry(lines.get(c.name, f"{c.group}/{c.name}"), c.group, c.where,
                              c.rows, c.name) for c in release.classes]
        return sorted(entries, key=lambda e: e.name), release.images

    # --------------------------------------------------------------------- CIFAR-100

    def _cifar_specs(self) -> dict[str, SplitSpec]:
        specs = {s: parse_split(s, v, self.root) for s, v in self.splits.items()}
        for split, spec in specs.items():
            if spec.kind == "csv":
                raise SettingError(f"splits.{split}: CSV splits name image files; source cifar100 "
                                 "takes class lists or fractions.")
        return specs

    def _plan_cifar(self, split: str) -> Plan:
        specs = self._cifar_specs()
        spec = specs[split]
        key = {**self.decoding.settings(), "source": "cifar100", "md5": CIFAR100.md5,
               "split": spec.entries if spec.kind == "classes" else
               {"fractions": {s: v.fraction for s, v in specs.items()}, "split": split,
                "listed": sorted(e for v in specs.values() for e in v.entries),
                "seed": self.split_seed}}
        archive = self.root / CIFAR100.filename
        return Plan(split, [], key, self.decoding.pixels,
                    lambda item: f"image {item} of {archive}", "cifar100",
                    lambda: self._read_cifar(split, specs))

    def _read_cifar(self, split: str, specs: Mapping[str, SplitSpec]
                    ) -> tuple[list[ClassEntry], Any]:
        archive, images, fine, fine_labels, group_of = self._cifar_archive()
        matched = {s: match_classes(v, group_of, f"CIFAR-100 ({archive})")
                   for s, v in specs.items() if v.kind == "classes"}
        check_disjoint({s: {name: name for _, name, _ in m} for s, m in matched.items()},
                       {s: v.where for s, v in specs.items()})
        if specs[split].kind == "fraction":
            fractions = {s: v for s, v in specs.items() if v.kind == "fraction"}
            taken = {name for m in matched.values() for _, name, _ in m}
            pool = [n for n in fine if n not in taken]
            chosen = [(n, n, group_of[n]) for n in
                      fraction_split(pool, fractions, self.split_seed)[split]]
        else:
            chosen = matched[split]
        entries = []
        for entry, name, group in sorted(chosen):
            rows = np.nonzero(fine_labels == fine.index(name))[0].tolist()
            entries.append(ClassEntry(entry, group, f"CIFAR-100 class {name} in {archive}",
                                      rows))
        return entries, images

    def _cifar_archive(self) -> tuple[Path, np.ndarray, list[str], np.ndarray, dict[str, str]]:
        """The archive (fetched if missing), its images of both batches (HWC), the fine class
        names, each image's fine label and each fine class's coarse one (its group)."""
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
        return archive, images, fine, fine_labels, group_of
