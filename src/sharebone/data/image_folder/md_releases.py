"""Meta-Dataset's sources whose releases are not a folder per class, read in their own layout.

Triantafillou et al. (ICLR 2020) convert each source from its public release; sharebone reads
the same releases, as the official converter (google-research/meta-dataset,
``dataset_conversion/dataset_to_records.py``) reads them, into the same memory-mapped cache as
every image family (``task.root`` is the folder named below):

- ``aircraft``: FGVC-Aircraft (``fgvc-aircraft-2013b/``): ``data/images/<id>.jpg`` labelled by
  ``data/images_variant_{train,val,test}.txt`` (``<id> <variant>`` lines; the variant is the
  class), each image cropped to its box in ``data/images_box.txt`` as the converter does
  (which also cuts off the 20-pixel copyright banner at the bottom).
- ``vgg_flower``: Oxford 102 Flowers: ``jpg/image_<NNNNN>.jpg`` labelled 1..102 by
  ``imagelabels.mat``; class ``k`` is the split files' ``<kkk>.<name>`` line.
- ``fungi``: the FGVCx Fungi release: ``train.json`` and ``val.json`` (COCO-style ``images``,
  ``annotations``, ``categories``) naming ``images/<class>/<file>``; class ``<id:04d>.<name>``.
- ``quickdraw``: the numpy bitmaps: ``<class>.npy``, uint8 ``[N, 784]`` (or ``[N, 28, 28]``)
  28x28 drawings per class, read memory-mapped; ``max_per_class`` caps a class (a QuickDraw
  class holds ~100,000 drawings).
- ``traffic_sign``: GTSRB ``Final_Training/Images/<000NN>/*.ppm`` with ``GT-<000NN>.csv``;
  class ``NN`` is the split file's ``<NN>.<name>`` line. Whole images, as Meta-Dataset takes
  them; ``roi: true`` crops each to its ``Roi.*`` box from the CSV instead.
- ``mscoco``: COCO 2017 ``annotations/instances_train2017.json`` and ``train2017/*.jpg``: each
  object annotation is one example, its box enlarged 1.2x (the converter's ratio) and cropped;
  its category names the class.

Annotation files are data: JSON and text are parsed, ``.npy`` files are opened with
``allow_pickle=False`` and ``.mat`` files by :func:`read_mat_array`, which reads numeric arrays
and nothing else. Every file, split line and image a source needs is checked before the first
image is decoded: a missing file or a class the split file names that the release lacks is one
error naming both.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sharebone.data.archives import DataError, DataNotFoundError, require_regular_file
from sharebone.data.image_folder.cache import Decoding
from sharebone.data.image_folder.classes import ClassEntry, check_root
from sharebone.data.image_folder.splits import (
    check_disjoint,
    fraction_split,
    match_classes,
    parse_split,
)
from sharebone.data.images import MAX_IMAGE_PIXELS
from sharebone.errors import SettingError

__all__ = ["MD_RELEASES", "Release", "read_mat_array", "read_md_release", "release_splits"]

#: The box enlargement of Meta-Dataset's MS-COCO converter (``box_scale_ratio``).
COCO_BOX_SCALE = 1.2


@dataclass
class Release:
    """One source's classes as its release describes them, before any image is decoded."""

    classes: dict[str, ClassEntry]  # class name -> entry (items: what ``decode`` takes)
    decode: Callable[[Any], np.ndarray]  # item -> uint8 [C, S, S]
    describe: Callable[[Any], str]  # item -> where it is, for messages
    key: dict[str, Any]  # what the cache depends on besides the items (annotation files)


def _need(path: Path, source: str, what: str) -> Path:
    """``path``, a regular file, or one error naming it and what the source reads it for."""
    if not path.exists():
        raise DataNotFoundError(
            f"{path} is missing (task.family.source={source} reads {what} from it). Fix: "
            f"point task.root at the folder of the unpacked release (see the README, "
            f"\"Meta-Dataset's data\").")
    require_regular_file(path)
    return path


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _image_items(root: Path, rels: list[str], source: str, where: str,
                 extra: list[Any] | None = None) -> list[list[Any]]:
    """``[relative path, size, mtime_ns, *extra[i]]`` per image, or one error listing the
    images the annotations name that are not there."""
    items, missing = [], []
    for i, rel in enumerate(rels):
        try:
            st = os.stat(root / rel)
        except OSError:
            missing.append(rel)
            continue
        items.append([rel, st.st_size, st.st_mtime_ns, *([extra[i]] if extra else [])])
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} image(s) that {where} names are not under {root}, e.g. "
            f"{', '.join(missing[:5])}. Fix: unpack the whole release there (task.family."
            f"source={source}), or point task.root at it.")
    return items


def _open_rgb(path: Path) -> Image.Image:
    img = Image.open(path)
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels is larger than "
                                           f"the {MAX_IMAGE_PIXELS:,} pixels sharebone decodes")
    return img.convert("RGB")


def _crop_decoder(root: Path, decoding: Decoding,
                  box: Callable[[Any, tuple[int, int]], tuple[int, int, int, int]]
                  ) -> Callable[[Any], np.ndarray]:
    """Decode ``root/item[0]`` cropped to ``box(item[3], (width, height))``."""

    def decode(item: list[Any]) -> np.ndarray:
        img = _open_rgb(root / item[0])
        x0, y0, x1, y1 = box(item[3], img.size)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"the box {item[3]} is empty in a {img.width}x{img.height} image")
        return decoding.pixels(np.asarray(img.crop((x0, y0, x1, y1))))

    return decode


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); is it the release's file?") from e


def _read_json(path: Path, source: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON ({e}); task.family.source={source} reads the "
                        "release's annotation file there.") from e


# ------------------------------------------------------------------------------- Aircraft


def _aircraft(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    data = root / "data"
    variant_files = [_need(data / f"images_variant_{s}.txt", "aircraft",
                           "each image's variant (its class)") for s in ("train", "val", "test")]
    boxes_file = _need(data / "images_box.txt", "aircraft", "each image's bounding box")
    boxes: dict[str, list[int]] = {}
    for number, line in enumerate(_read_text(boxes_file).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 or not all(p.isdigit() for p in parts[1:]):
            raise DataError(f"{boxes_file} line {number}: {line!r} is not '<id> xmin ymin xmax "
                            "ymax'.")
        boxes[parts[0]] = [int(p) for p in parts[1:]]
    by_variant: dict[str, list[str]] = {}
    for path in variant_files:
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if not variant:
                raise DataError(f"{path} line {number}: {line!r} is not '<id> <variant>'.")
            if image not in boxes:
                raise DataError(f"{path} line {number}: image {image} has no box in "
                                f"{boxes_file}; is the release complete?")
            by_variant.setdefault(variant.strip(), []).append(image)
    classes = {}
    for variant, images in by_variant.items():
        images = sorted(set(images))
        items = _image_items(root, [f"data/images/{i}.jpg" for i in images], "aircraft",
                             f"{data}/images_variant_*.txt", [boxes[i] for i in images])
        classes[variant] = ClassEntry(variant, "", f"variant {variant} of {root}", items,
                                      f"aircraft/{variant}")

    def box(b: list[int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        return b[0], b[1], min(b[2], size[0]), min(b[3], size[1])

    return Release(classes, _crop_decoder(root, decoding, box), lambda item: str(root / item[0]),
                   {"files": [_stat(p) for p in (*variant_files, boxes_file)]})


# ----------------------------------------------------------------------------- VGG Flower


def _numbered(ids: list[int], width: int, lines: list[str]) -> dict[int, str]:
    """Class number -> its name in the split files (``<number:0width>.<name>``), else the bare
    number."""
    named = {}
    for line in lines:
        head, dot, _ = line.partition(".")
        if dot and head.isdigit() and len(head) == width:
            named[int(head)] = line
    return {i: named.get(i, f"{i:0{width}d}") for i in ids}


def _split_lines(splits: Mapping[str, Any], root: Path) -> list[str]:
    lines: list[str] = []
    for split, value in splits.items():
        spec = parse_split(split, value, root)
        lines += spec.entries
    return lines


def _vgg_flower(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    labels_file = _need(root / "imagelabels.mat", "vgg_flower", "each image's label")
    labels = read_mat_array(labels_file, "labels").ravel()
    if labels.size == 0 or np.any(labels < 1) or np.any(labels != np.round(labels)):
        raise DataError(f"{labels_file}: 'labels' is not a list of class numbers 1, 2, ...")
    labels = labels.astype(np.int64)
    names = _numbered(sorted(set(labels.tolist())), 3, options["lines"])
    classes = {}
    for label, name in names.items():
        rows = np.nonzero(labels == label)[0]
        items = _image_items(root, [f"jpg/image_{r + 1:05d}.jpg" for r in rows], "vgg_flower",
                             str(labels_file))
        classes[name] = ClassEntry(name, "", f"class {label} of {labels_file}", items,
                                   f"vgg_flower/{label}")
    return Release(classes, lambda item: decoding.decode(root / item[0]),
                   lambda item: str(root / item[0]), {"files": [_stat(labels_file)]})


# ---------------------------------------------------------------------------------- Fungi


def _fungi(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    files = [_need(root / f"{s}.json", "fungi", "the images' classes") for s in ("train", "val")]
    categories: dict[int, str] = {}
    image_files: dict[Any, str] = {}
    image_class: dict[Any, int] = {}
    for path in files:
        doc = _read_json(path, "fungi")
        if not isinstance(doc, dict) or not {"images", "annotations", "categories"} <= set(doc):
            raise DataError(f"{path} is not a COCO-style annotation file (images, annotations, "
                            "categories); is it the Fungi release's?")
        try:
            for c in doc["categories"]:
                categories[int(c["id"])] = str(c["name"])
            for image in doc["images"]:
                image_files[image["id"]] = str(image["file_name"])
            for a in doc["annotations"]:
                image_class[a["image_id"]] = int(a["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: an entry lacks its id, name, file_name or category_id "
                            f"({e!r}).") from e
    by_class: dict[int, list[str]] = {}
    for image, category in image_class.items():
        rel = image_files.get(image)
        if rel is None or category not in categories:
            raise DataError(f"{files[0].parent}: annotation of image {image} names "
                            f"{'an unknown image' if rel is None else f'category {category}'}"
                            ", which the files do not list.")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{files[0].parent}: file_name {rel!r} is not inside task.root; "
                            "refusing it.")
        by_class.setdefault(category, []).append(rel)
    classes = {}
    for category, rels in sorted(by_class.items()):
        name = f"{category:04d}.{categories[category]}"
        items = _image_items(root, sorted(set(rels)), "fungi", "train.json / val.json")
        classes[name] = ClassEntry(name, "", f"category {category} of {root}", items,
                                   f"fungi/{category}")
    return Release(classes, lambda item: decoding.decode(root / item[0]),
                   lambda item: str(root / item[0]), {"files": [_stat(p) for p in files]})


# ------------------------------------------------------------------------------ QuickDraw


def _quickdraw(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    cap = options.get("max_per_class")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise SettingError(f"task.family.max_per_class must be a positive int or null (every "
                           f"drawing), got {cap!r}.")
    paths = sorted(p for p in check_root(root).iterdir()
                   if p.suffix == ".npy" and not p.name.startswith("."))
    if not paths:
        raise DataNotFoundError(f"{root} holds no <class>.npy files; task.family.source="
                                "quickdraw reads the numpy bitmaps (see the README).")
    arrays: dict[str, np.ndarray] = {}
    classes = {}
    for path in paths:
        require_regular_file(path)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path} is not a plain numpy array ({e}); it is not read.") from e
        if array.dtype not in (np.uint8, np.bool_) or array.ndim not in (2, 3) or (
                array.ndim == 2 and round(array.shape[1] ** 0.5) ** 2 != array.shape[1]) or (
                array.ndim == 3 and array.shape[1] != array.shape[2]) or not len(array):
            raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 [N, side*side]"
                            " (or [N, side, side]) drawings.")
        name = path.stem
        arrays[name] = array
        rows = range(len(array) if cap is None else min(cap, len(array)))
        classes[name] = ClassEntry(name, "", str(path), [[name, r] for r in rows],
                                   f"quickdraw/{name}")

    def decode(item: list[Any]) -> np.ndarray:
        row = np.asarray(arrays[item[0]][item[1]])
        side = row.shape[-1] if row.ndim == 2 else round(row.shape[0] ** 0.5)
        row = row.reshape(side, side)
        return decoding.pixels(row.astype(np.uint8) * 255 if row.dtype == np.bool_ else row)

    return Release(classes, decode, lambda item: f"drawing {item[1]} of {root / item[0]}.npy",
                   {"files": [_stat(p) for p in paths], "max_per_class": cap})


# -------------------------------------------------------------------------- Traffic Signs


def _traffic_sign(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    images = root / "Final_Training" / "Images"
    if not images.is_dir():
        raise DataNotFoundError(f"{images} is missing (task.family.source=traffic_sign reads "
                                "GTSRB's Final_Training/Images/<000NN>/ folders under "
                                "task.root=<...>/GTSRB).")
    folders = sorted(p for p in images.iterdir() if p.is_dir() and re.fullmatch(r"\d{5}", p.name))
    if not folders:
        raise DataError(f"{images} holds no <000NN> class folders; is it GTSRB's training set?")
    names = _numbered([int(f.name) for f in folders], 2, options["lines"])
    roi = bool(options.get("roi", False))
    classes, stats = {}, []
    for folder in folders:
        table = _need(folder / f"GT-{folder.name}.csv", "traffic_sign",
                      "the class's images and their regions of interest")
        stats.append(_stat(table))
        rows = list(csv.reader(io.StringIO(_read_text(table)), delimiter=";"))
        header = [h.strip() for h in rows[0]] if rows else []
        want = ["Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"]
        if not set(want) <= set(header):
            raise DataError(f"{table}: the header {header} lacks {want}; is it GTSRB's "
                            "GT-<class>.csv?")
        col = [header.index(w) for w in want]
        rels, boxes = [], []
        for number, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            try:
                name, *box = (row[c].strip() for c in col)
                box = [int(v) for v in box]
            except (IndexError, ValueError) as e:
                raise DataError(f"{table} line {number}: {row!r} ({e}).") from e
            if "/" in name or name.startswith("."):
                raise DataError(f"{table} line {number}: {name!r} is not a file name.")
            rels.append(f"Final_Training/Images/{folder.name}/{name}")
            boxes.append(box)
        items = _image_items(root, rels, "traffic_sign", str(table), boxes)
        name = names[int(folder.name)]
        classes[name] = ClassEntry(name, "", str(folder), items, f"traffic_sign/{folder.name}")

    def box(b: list[int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        return b[0], b[1], min(b[2] + 1, size[0]), min(b[3] + 1, size[1])  # X2, Y2 inclusive

    decode = (_crop_decoder(root, decoding, box) if roi
              else lambda item: decoding.decode(root / item[0]))
    return Release(classes, decode, lambda item: str(root / item[0]),
                   {"files": stats, "roi": roi})


# -------------------------------------------------------------------------------- MS-COCO


def coco_box(bbox: list[float], size: tuple[int, int],
             scale: float = COCO_BOX_SCALE) -> tuple[int, int, int, int]:
    """A COCO ``[x, y, w, h]`` box enlarged ``scale`` times about its centre, as integer pixel
    corners clipped to the image (the official converter's rounding)."""
    x, y, w, h = bbox
    x, y = x - 0.5 * w * (scale - 1), y - 0.5 * h * (scale - 1)
    w, h = w * scale, h * scale
    return (max(int(round(x - 0.5)), 0), max(int(round(y - 0.5)), 0),
            min(int(round(x + w - 0.5)) + 1, size[0]), min(int(round(y + h - 0.5)) + 1, size[1]))


def _mscoco(root: Path, decoding: Decoding, options: Mapping[str, Any]) -> Release:
    path = _need(root / "annotations" / "instances_train2017.json", "mscoco",
                 "the object annotations")
    images = root / "train2017"
    if not images.is_dir():
        raise DataNotFoundError(f"{images} is missing (task.family.source=mscoco crops the "
                                "objects of instances_train2017.json out of its images).")
    doc = _read_json(path, "mscoco")
    if not isinstance(doc, dict) or not {"annotations", "categories"} <= set(doc):
        raise DataError(f"{path} is not a COCO instances file (annotations, categories).")
    try:
        categories = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        by_class: dict[int, list[list[Any]]] = {}
        for a in doc["annotations"]:
            bbox = [float(v) for v in a["bbox"]]
            if len(bbox) != 4:
                raise ValueError(f"bbox {a['bbox']!r}")
            by_class.setdefault(int(a["category_id"]), []).append(
                [f"train2017/{int(a['image_id']):012d}.jpg", int(a["id"]), 0, bbox])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: an annotation or category is malformed ({e!r}).") from e
    unknown = sorted(set(by_class) - set(categories))
    if unknown:
        raise DataError(f"{path}: annotations name categories {unknown[:5]} that it does not "
                        "list.")
    wanted = {f"train2017/{int(a['image_id']):012d}.jpg" for a in doc["annotations"]}
    missing = sorted(r for r in wanted if not (root / r).is_file())
    if missing:
        raise DataNotFoundError(f"{len(missing)} image(s) that {path} annotates are not in "
                                f"{images}, e.g. {', '.join(missing[:5])}. Fix: unpack "
                                "train2017.zip there.")
    classes = {}
    for category, items in sorted(by_class.items()):
        name = categories[category]
        classes[name] = ClassEntry(name, "", f"category {name} of {path}",
                                   sorted(items, key=lambda i: i[1]), f"mscoco/{category}")
    return Release(classes, _crop_decoder(root, decoding, coco_box),
                   lambda item: f"annotation {item[1]} ({root / item[0]})",
                   {"files": [_stat(path)], "box_scale": COCO_BOX_SCALE})


#: ``task.family.source`` -> reader of that release.
MD_RELEASES: dict[str, Callable[[Path, Decoding, Mapping[str, Any]], Release]] = {
    "aircraft": _aircraft, "vgg_flower": _vgg_flower, "fungi": _fungi,
    "quickdraw": _quickdraw, "traffic_sign": _traffic_sign, "mscoco": _mscoco,
}


def read_md_release(source: str, root: Path, decoding: Decoding, splits: Mapping[str, Any],
                 options: Mapping[str, Any]) -> Release:
    """The classes of ``source``'s release under ``root`` (nothing decoded yet)."""
    check_root(root)
    return MD_RELEASES[source](root, decoding, {**options, "lines": _split_lines(splits, root)})


def release_splits(release: Release, splits: Mapping[str, Any], root: Path, seed: int,
                   source: str) -> dict[str, list[ClassEntry]]:
    """Every split's classes of ``release``: class lists matched against it (a line it lacks
    is refused, naming the file), fractions drawn from the classes no list names."""
    specs = {s: parse_split(s, v, root) for s, v in splits.items()}
    for split, spec in specs.items():
        if spec.kind == "csv":
            raise SettingError(f"task.family.splits.{split}: source {source} takes class lists "
                               "or fractions, not a CSV of files.")
    available = {name: entry.group for name, entry in release.classes.items()}
    describe = f"the {source} release in {root}"
    chosen = {s: [release.classes[name] for _, name, _ in match_classes(spec, available,
                                                                         describe)]
              for s, spec in specs.items() if spec.kind == "classes"}
    check_disjoint({s: {c.ident: c.name for c in cs} for s, cs in chosen.items()},
                   {s: spec.where for s, spec in specs.items()})
    fractions = {s: spec for s, spec in specs.items() if spec.kind == "fraction"}
    if fractions:
        taken = {c.name for cs in chosen.values() for c in cs}
        pool = [n for n in release.classes if n not in taken]
        for split, names in fraction_split(pool, fractions, seed).items():
            chosen[split] = [release.classes[n] for n in names]
    return {s: sorted(chosen[s], key=lambda c: c.name) for s in splits}


# ------------------------------------------------------------------------ MATLAB v5 files

_MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8",
              12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _elements(data: bytes, order: str) -> list[tuple[int, bytes]]:
    """The (type, bytes) data elements of a MAT-file body (small elements unpacked)."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        kind, size = struct.unpack(order + "II", data[pos:pos + 8])
        if kind >> 16:  # small data element: size in the high half, data in the tag
            size, kind = kind >> 16, kind & 0xFFFF
            out.append((kind, data[pos + 4:pos + 4 + size]))
            pos += 8
            continue
        body = data[pos + 8:pos + 8 + size]
        if len(body) != size:
            raise ValueError("a data element runs past the end of the file")
        out.append((kind, body))
        pos += 8 + size + (-size % 8 if kind != _MI_COMPRESSED else 0)
    return out


def read_mat_array(path: Path, name: str) -> np.ndarray:
    """The numeric array ``name`` of a MATLAB 5 ``.mat`` file (compressed or not), read as
    data: only numeric matrices are understood, and nothing in the file is run."""
    raw = path.read_bytes()
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path} is not a MATLAB 5 .mat file (no MAT-file header).")
    order = "<" if raw[126:128] == b"IM" else ">"
    try:
        elements = _elements(raw[128:], order)
        for kind, body in elements:
            if kind == _MI_COMPRESSED:
                kind, body = _elements(zlib.decompress(body), order)[0]
            if kind != _MI_MATRIX:
                continue
            parts = _elements(body, order)
            if len(parts) < 4:
                continue
            (_, flags), (_, dims), (_, label), (real_kind, real) = parts[:4]
            if label.decode("latin1") != name:
                continue
            matlab_class = struct.unpack(order + "I", flags[:4])[0] & 0xFF
            if not 6 <= matlab_class <= 15 or real_kind not in _MAT_TYPES:
                raise ValueError(f"'{name}' is not a numeric matrix (class {matlab_class})")
            shape = struct.unpack(order + f"{len(dims) // 4}i", dims)
            values = np.frombuffer(real, dtype=np.dtype(_MAT_TYPES[real_kind]).newbyteorder(
                order))
            return values.reshape(shape, order="F").astype(np.float64)
    except (ValueError, struct.error, zlib.error, IndexError) as e:
        raise DataError(f"{path} cannot be read as a .mat file ({e}).") from e
    raise DataError(f"{path} holds no numeric array '{name}'; is it the release's file?")
