"""The tieredImageNet release of Ren et al. (2018): pickled PNGs and their labels.

Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR 2018
(renmengye/few-shot-ssl-public), publish tieredImageNet as two pickles per split::

    root/<split>_images_png.pkl   a list of PNG-encoded images, one uint8 array of the file's
                                  bytes each (as ``cv2.imencode`` returns them), 84x84 RGB
    root/<split>_labels.pkl       {label_specific: int [N], label_general: int [N],
                                   label_specific_str: [class names],
                                   label_general_str: [category names]}

written by Python 2, so they are read with ``encoding="latin1"`` (Python 2 ``str`` becomes
``str``; numpy arrays keep their bytes). Both are read by
:func:`sharebone.data.archives.load_data_pickle`: numpy arrays, lists, dicts and strings, and
nothing that could run code. The image pickle is held in memory while its split is decoded
(about its file size, gigabytes for ``train``), once per machine, into the memory-mapped cache.
Pillow decodes the PNGs as RGB. (The PNGs were written by ``cv2.imencode`` from
``cv2.imread``'s BGR arrays, so the files are ordinary RGB PNGs; the reference code's
``cv2.imdecode`` gives BGR arrays back, sharebone's cache holds RGB like every other source.)

The release names classes and categories by their ImageNet words (``"goldfinch, Carduelis
carduelis"``, ``"passerine, passeriform bird"``; category names cut at 46 characters).
:func:`read_release` names them by wnid again through a table (``tasks/splits/
tiered_imagenet/names.txt``), so that they match the published class lists and the class
folders of the same benchmark; a name the table lacks is kept as the release spells it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharebone.data.archives import DataError, DataNotFoundError, load_data_pickle
from sharebone.errors import SettingError

__all__ = ["IMAGES_FILE", "LABELS_FILE", "LABEL_KEYS", "Release", "png_bytes", "read_names",
           "read_release", "release_files"]

IMAGES_FILE = "{split}_images_png.pkl"
LABELS_FILE = "{split}_labels.pkl"
LABEL_KEYS = ("label_specific", "label_general", "label_specific_str", "label_general_str")
#: The shipped wnid -> name table (relative to sharebone's ``tasks/``).
NAMES_FILE = "splits/tiered_imagenet/names.txt"


@dataclass
class ReleaseClass:
    """One class of a split of the release: its name (a wnid where the names table has it),
    its category (likewise) and the indices of its images in the image pickle."""

    name: str
    group: str
    where: str
    rows: list[int]


@dataclass
class Release:
    """One split of the release: its classes and the encoded images they index."""

    classes: list[ReleaseClass]
    images: list[Any]  # per image: uint8 array (or bytes) of a PNG file


def release_files(root: Path, split: str) -> tuple[Path, Path]:
    """``(images, labels)`` pickles of ``split`` under ``root``, or a clear error."""
    files = (root / IMAGES_FILE.format(split=split), root / LABELS_FILE.format(split=split))
    missing = [p.name for p in files if not p.exists()]
    if missing:
        raise DataNotFoundError(
            f"{' and '.join(missing)} missing from {root} (source: tiered_imagenet_pickle reads "
            f"{IMAGES_FILE.format(split='<split>')} and {LABELS_FILE.format(split='<split>')} "
            "for every split, as Ren et al. (2018) publish tieredImageNet). Fix: put them "
            "there, or use source=folder with the images.")
    return files


def _text(value: Any) -> Any:
    """Python 2 ``str`` read as bytes (``encoding="bytes"``, or a re-pickled release) -> str."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def read_names(path: Path) -> dict[str, str]:
    """``wnid -> name`` from a ``<wnid><TAB><name>`` table (``#`` lines are comments)."""
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        wnid, sep, name = line.partition("\t")
        if not sep or not wnid.strip() or not name.strip():
            raise DataError(f"{path} line {number}: expected <wnid><TAB><name>, got {line!r}.")
        table[wnid.strip()] = name.strip()
    return table


def _read_labels(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    with open(path, "rb") as f:
        obj = load_data_pickle(f, str(path), encoding="latin1")
    fix = f" Fix: replace {path.name} with the file of the tieredImageNet release."
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the release's labels (a dict "
                        f"with {', '.join(LABEL_KEYS)}).{fix}")
    obj = {_text(k): v for k, v in obj.items()}
    missing = [k for k in LABEL_KEYS if k not in obj]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (it has {sorted(map(str, obj))}); "
                        f"the release's labels are a dict with {', '.join(LABEL_KEYS)}.{fix}")
    names = {}
    for key in ("label_specific_str", "label_general_str"):
        value = obj[key]
        if not isinstance(value, list | tuple | np.ndarray) or not all(
                isinstance(_text(n), str) for n in value):
            raise DataError(f"{path}: {key} is not a list of names.{fix}")
        names[key] = [_text(n) for n in value]
    labels = {}
    for key, names_key in (("label_specific", "label_specific_str"),
                           ("label_general", "label_general_str")):
        value = np.asarray(obj[key]) if isinstance(obj[key], list | tuple) else obj[key]
        if (not isinstance(value, np.ndarray) or value.ndim != 1
                or value.dtype.kind not in "iu"):
            raise DataError(f"{path}: {key} is not a 1-D array of integer labels.{fix}")
        n = len(names[names_key])
        if len(value) and (value.min() < 0 or value.max() >= n):
            raise DataError(f"{path}: {key} has labels outside 0..{n - 1} ({names_key} names "
                            f"{n}).{fix}")
        labels[key] = value.astype(np.int64)
    if len(labels["label_specific"]) != len(labels["label_general"]):
        raise DataError(f"{path}: label_specific has {len(labels['label_specific'])} labels, "
                        f"label_general {len(labels['label_general'])}.{fix}")
    return (labels["label_specific"], labels["label_general"], names["label_specific_str"],
            names["label_general_str"])


def _read_images(path: Path, expected: int, labels_path: Path) -> list[Any]:
    with open(path, "rb") as f:
        obj = load_data_pickle(f, str(path), encoding="latin1")
    if not isinstance(obj, list | tuple):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the release's list of PNG "
                        "images. Fix: replace it with the file of the tieredImageNet release.")
    if len(obj) != expected:
        raise DataError(f"{path} holds {len(obj)} images, {labels_path} labels {expected}: "
                        "they are not one split's pair (or one is truncated). Fix: download "
                        "both again.")
    return list(obj)


def png_bytes(item: Any) -> bytes:
    """One image of the release as the bytes of its PNG file.

    Raises:
        ValueError: ``item`` is neither bytes nor a uint8 array (a decode error: the family's
            ``corrupt`` setting refuses or skips it).
    """
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise SettingError(f"not the bytes of an image file (a {type(item).__name__}"
                       f"{' of ' + str(item.dtype) if isinstance(item, np.ndarray) else ''})")


def _wnids_by_name(names: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for wnid, name in names.items():
        out.setdefault(name, []).append(wnid)
    return out


def _wnid(name: str, by_name: dict[str, list[str]], names: dict[str, str],
          prefix: bool) -> str:
    """The one wnid named ``name`` (or, with ``prefix``, whose name ``name`` begins: the
    release cuts category names), else ``name`` itself."""
    found = by_name.get(name, [])
    if not found and prefix:
        found = [w for w, n in names.items() if n.startswith(name)]
    return found[0] if len(found) == 1 else name


def read_release(root: Path, split: str, names: dict[str, str] | None = None) -> Release:
    """One split of the tieredImageNet release under ``root``, checked.

    Args:
        root: the folder holding ``<split>_images_png.pkl`` and ``<split>_labels.pkl``.
        split: ``train``, ``val`` or ``test`` (any name the files carry).
        names: ``wnid -> name`` (:func:`read_names`), to name classes and categories by wnid.

    Raises:
        DataNotFoundError: a file is missing.
        UnsafePickleError: a pickle asks for anything but arrays, lists, dicts and strings.
        DataError: the labels lack a key or disagree with the images (counts, ranges, a class
            spread over two categories).
    """
    images_path, labels_path = release_files(root, split)
    specific, general, specific_str, general_str = _read_labels(labels_path)
    images = _read_images(images_path, len(specific), labels_path)
    by_name = _wnids_by_name(names or {})
    classes = []
    for c, name in enumerate(specific_str):
        rows = np.nonzero(specific == c)[0]
        if not len(rows):
            continue  # a name no image carries
        categories = np.unique(general[rows])
        if len(categories) != 1:
            raise DataError(
                f"{labels_path}: class {name!r} has images in {len(categories)} categories "
                f"({', '.join(general_str[g] for g in categories[:5])}); in tieredImageNet a "
                "class belongs to one category. Fix: download the labels again.")
        category = general_str[categories[0]]
        wnid = _wnid(name, by_name, names or {}, prefix=False)
        classes.append(ReleaseClass(wnid, _wnid(category, by_name, names or {}, prefix=True),
                                    f"class {name!r} of {labels_path}", rows.tolist()))
    if not classes:
        raise DataError(f"{labels_path} labels no image. Fix: download it again.")
    return Release(classes, images)
