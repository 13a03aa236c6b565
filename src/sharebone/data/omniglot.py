"""Omniglot (Lake et al., 2015) as compact uint8 tensors, with the usual few-shot splits.

Omniglot has 1623 handwritten characters from 50 alphabets, 20 drawings each (105x105, 1-bit
PNG), shipped as zip archives laid out ``<archive>/<alphabet>/<characterNN>/<id>_<drawer>.png``.
A *class* is a character, identified as ``"<alphabet>/<characterNN>"``; with rotation
augmentation (Santoro et al., 2016; Vinyals et al., 2016) each rotation of a character is a class
of its own, ``"<alphabet>/<characterNN>/rot90"``.

Preprocessing (:data:`PREPROCESSING`, passed to the decoder explicitly): grayscale,
**inverted** so that strokes are bright (255) and the background is 0 (the usual convention
for Omniglot models; :func:`load_image` itself inverts nothing unless asked), then resized to
``image_size x image_size`` with Lanczos antialiasing; pixels are stored as uint8 0..255.
Members whose path has a hidden part (``.ipynb_checkpoints/``, ``.DS_Store``, ``._x.png``) or
that sit under ``__MACOSX/`` are not drawings and are skipped.

Each archive is decoded once and cached in ``cache_dir`` as a ``.pt`` file keyed by the archive's
md5 and the image size; later loads read that file (milliseconds) and do not need the archive.

Example (the two "small" background sets, 242 characters)::

    split = load_split(
        {"archives": ["images_background_small1", "images_background_small2"]},
        data_dir="../shared/data", cache_dir="~/.cache/sharebone",
    )
    split.images.shape  # torch.Size([4840, 1, 28, 28])
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sharebone.data.archives import (
    ArchiveSpec,
    CorruptArchiveError,
    DataError,
    SafeZip,
    ensure_archives,
    resolve_data_dir,
)
from sharebone.data.images import (  # noqa: F401  (load_image, MAX_IMAGE_PIXELS: public here too)
    DECODE_ERRORS,
    MAX_IMAGE_PIXELS,
    ImageSet,
    check_decode_args,
    decode_array,
    load_image,
)
from sharebone.errors import SettingError, refused_pickle
from sharebone.files import atomic_write

log = logging.getLogger(__name__)

_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


def _official(name: str, md5: str) -> ArchiveSpec:
    return ArchiveSpec(name=name, url=f"{_BASE_URL}/{name}.zip", md5=md5, filename=f"{name}.zip")


#: The official archives (brendenlake/omniglot, folder python/). The md5s of the full sets are
#: the ones torchvision's ``Omniglot`` uses; the small sets' are those of ../shared/data.
OMNIGLOT_ARCHIVES: dict[str, ArchiveSpec] = {
    spec.name: spec
    for spec in (
        _official("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
        _official("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"),
        _official("images_background_small1", "e704a628b5459e08445c13499850abc4"),
        _official("images_background_small2", "b75a71a51d3b13f821f212756fe481fd"),
    )
}

#: Rotations (degrees, counter-clockwise) a split may ask for.
ROTATIONS = (0, 90, 180, 270)

#: Keys a split spec may have.
SPLIT_KEYS = ("archives", "alphabets", "exclude_alphabets", "characters", "rotations")

#: Subfolder of ``data_dir`` that holds the archives.
DATASET_DIR = "omniglot"

_CACHE_FORMAT = "sharebone.omniglot.v1"
#: How an Omniglot drawing is read (the decoder's keyword settings): inverted, so strokes are
#: bright. Cached archives hold drawings read this way (and a user's episode folder scored
#: against an Omniglot task is read the same way, :meth:`OmniglotTasks.preprocessing`).
PREPROCESSING: dict[str, Any] = {"invert": True}


# ----------------------------------------------------------------------------------- decoding
# (one image: sharebone.data.images, shared with every image family)


def _natural_key(text: str) -> tuple[tuple[Any, ...], str]:
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if p.isdigit() else p.lower() for p in parts), text


@dataclass(frozen=True, eq=False)
class DecodedArchive:
    """One Omniglot archive decoded: images grouped by character.

    Attributes:
        images: uint8 ``[N, 1, S, S]``, character by character.
        offsets: int64 ``[n_characters + 1]``; character ``i`` is
            ``images[offsets[i] : offsets[i + 1]]``.
        characters: ``"<alphabet>/<character>"`` per character, sorted by (alphabet, character).
    """

    images: torch.Tensor
    offsets: torch.Tensor
    characters: list[str]


def decode_archive(path: str | os.PathLike[str], image_size: int = 28) -> DecodedArchive:
    """Decode every drawing of an Omniglot-layout zip (no extraction to disk).

    Raises:
        UnsafeArchiveError: a member path is absolute or contains ``..``.
        CorruptArchiveError: the zip is corrupt, a PNG cannot be decoded, or the layout is not
            ``<archive>/<alphabet>/<character>/<file>.png``.
    """
    path = Path(path)
    check_decode_args(image_size, 1)  # a bad argument is not a corrupt archive
    start = time.perf_counter()
    with SafeZip(path) as archive:
        groups: dict[tuple[str, str], list[str]] = {}
        for name in archive.names(suffix=".png"):
            parts = name.split("/")
            if parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
                continue  # macOS resource forks, .ipynb_checkpoints/, other hidden files
            if len(parts) != 4 or not all(parts):
                raise CorruptArchiveError(
                    f"Archive {path}: member {name!r} is not laid out as "
                    "<archive>/<alphabet>/<character>/<file>.png; is this an Omniglot archive?"
                )
            groups.setdefault((parts[1], parts[2]), []).append(name)
        if not groups:
            raise CorruptArchiveError(
                f"Archive {path} holds no PNG drawings; is this an Omniglot archive?"
            )
        keys = sorted(groups, key=lambda k: (_natural_key(k[0]), _natural_key(k[1])))
        out = np.empty((sum(len(v) for v in groups.values()), image_size, image_size), np.uint8)
        counts = []
        i = 0
        for key in keys:
            members = sorted(groups[key])
            for name in members:
                try:
                    out[i] = decode_array(archive.read(name), image_size, 1, **PREPROCESSING)
                except DECODE_ERRORS as e:
                    raise CorruptArchiveError(
                        f"Archive {path}: cannot decode {name!r} ({e}). Fix: delete the archive "
                        "and download it again."
                    ) from e
                i += 1
            counts.append(len(members))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    log.info(
        "Decoded %s: %d characters, %d images in %.2fs",
        path.name,
        len(keys),
        len(out),
        time.perf_counter() - start,
    )
    return DecodedArchive(
        images=torch.from_numpy(out).unsqueeze(1),
        offsets=offsets,
        characters=[f"{a}/{c}" for a, c in keys],
    )


# -------------------------------------------------------------------------------------- cache


def cache_path(spec: ArchiveSpec, cache_dir: str | os.PathLike[str], image_size: int) -> Path:
    """Where the decoded ``spec`` at ``image_size`` is cached (keyed by md5 and image size)."""
    return (
        Path(cache_dir).expanduser()
        / DATASET_DIR
        / f"{spec.name}-{spec.md5}-{image_size}px-{_CACHE_FORMAT.rsplit('.', 1)[-1]}.pt"
    )


def _validate_cached(obj: Any, spec: ArchiveSpec, image_size: int) -> DecodedArchive:
    if not isinstance(obj, dict):
        raise SettingError(f"not a dict but {type(obj).__name__}")
    if obj.get("format") != _CACHE_FORMAT or obj.get("md5") != spec.md5:
        raise SettingError("format or md5 mismatch")
    if obj.get("image_size") != image_size:
        raise SettingError("image size mismatch")
    images, offsets, characters = obj["images"], obj["offsets"], obj["characters"]
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        raise SettingError("images are not a uint8 tensor")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, image_size, image_size):
        raise SettingError(f"images have shape {tuple(images.shape)}")
    if not (isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int64):
        raise SettingError("offsets are not an int64 tensor")
    if not (isinstance(characters, list) and all(isinstance(c, str) for c in characters)):
        raise SettingError("characters are not a list of str")
    if offsets.shape != (len(characters) + 1,) or int(offsets[0]) != 0:
        raise SettingError("offsets do not match characters")
    if int(offsets[-1]) != images.shape[0] or not bool((offsets[1:] > offsets[:-1]).all()):
        raise SettingError("offsets do not match images")
    return DecodedArchive(images=images, offsets=offsets, characters=characters)


def _read_cache(path: Path, spec: ArchiveSpec, image_size: int) -> DecodedArchive | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # absent (or unreadable): decode the archive
    if not stat.S_ISREG(mode):
        # A FIFO would block the read forever; a folder is not ours to remove.
        log.warning("Cache entry %s is not a regular file; ignoring it (remove it to let the "
                    "cache work again).", path)
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _validate_cached(obj, spec, image_size)
    except Exception as e:  # any failure at all means: do not trust this file
        log.warning("Cache file %s is corrupt or stale (%s); removing it and rebuilding.", path,
                    refused_pickle(e) or e)
        try:
            path.unlink(missing_ok=True)
        except OSError as unlink_error:
            log.warning("Cannot remove %s: %s", path, unlink_error)
        return None


def _write_cache(path: Path, spec: ArchiveSpec, image_size: int, decoded: DecodedArchive) -> None:
    obj = {
        "format": _CACHE_FORMAT,
        "md5": spec.md5,
        "image_size": image_size,
        "images": decoded.images,
        "offsets": decoded.offsets,
        "characters": decoded.characters,
    }
    if path.exists() and not path.is_file():
        return  # a folder or FIFO there is left alone (_read_cache has said so)
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as e:
        # The cache only saves time: a read-only or full cache folder must not stop a run.
        log.warning("Cannot write the cache file %s (%s); continuing without it.", path, e)


def load_archive(
    spec: ArchiveSpec,
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    image_size: int = 28,
    download: bool = True,
) -> DecodedArchive:
    """One archive decoded, from the cache if there is a valid entry, else from the zip.

    The zip is looked up (and downloaded if missing and ``download``) at
    ``<data_dir>/omniglot/<spec.filename>``. A cache hit does not touch the zip. A cache file that
    cannot be loaded or fails validation is removed and rebuilt. ``cache_dir=None`` disables the
    cache.
    """
    return load_archives([spec], data_dir, cache_dir, image_size, download)[0]


def load_archives(
    specs: Sequence[ArchiveSpec],
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    image_size: int = 28,
    download: bool = True,
) -> list[DecodedArchive]:
    """Several archives decoded, as :func:`load_archive` does one.

    The archives the cache does not hold are looked up together, so a missing-data error lists
    every missing archive (with its URL and where it is expected), not just the first one.
    """
    paths = [
        cache_path(spec, cache_dir, image_size) if cache_dir is not None else None
        for spec in specs
    ]
    decoded = [
        _read_cache(path, spec, image_size) if path is not None else None
        for spec, path in zip(specs, paths, strict=True)
    ]
    todo = [i for i, d in enumerate(decoded) if d is None]
    if todo:
        root = resolve_data_dir(data_dir) / DATASET_DIR
        archives = ensure_archives([specs[i] for i in todo], root, download=download)
        for i, archive in zip(todo, archives, strict=True):
            decoded[i] = decode_archive(archive, image_size)
            if paths[i] is not None:
                _write_cache(paths[i], specs[i], image_size, decoded[i])
    return decoded  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- splits


def _as_plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    if not isinstance(spec, Mapping):
        raise DataError(f"A split spec must be a mapping, got {type(spec).__name__}: {spec!r}")
    return {
        k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
        for k, v in spec.items()
    }


def _str_list(spec: dict[str, Any], key: str) -> list[str] | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"Split key {key!r} must be a list of names, got {value!r}")
    return value


def _parse_slice(value: Any) -> slice:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value)
    ):
        raise DataError(
            f"Split key 'characters' must be [start, stop] (ints or null, a Python slice), got "
            f"{value!r}"
        )
    return slice(value[0], value[1])


def _parse_rotations(value: Any) -> list[int]:
    if value is None:
        return [0]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or any(v not in ROTATIONS or isinstance(v, bool) for v in value)
        or len(set(value)) != len(value)
    ):
        raise DataError(
            f"Split key 'rotations' must be a non-empty list of distinct values from "
            f"{list(ROTATIONS)}, got {value!r}"
        )
    return [int(v) for v in value]


def load_split(
    spec: Mapping[str, Any],
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    image_size: int = 28,
    download: bool = True,
    archives: Mapping[str, ArchiveSpec] | None = None,
) -> ImageSet:
    """The images of one split of Omniglot, described by ``spec`` (a dict or Hydra DictConfig).

    Spec keys:
        archives: list of archive names (required), keys of ``OMNIGLOT_ARCHIVES``. A character
            present in several archives (by ``(alphabet, character)``, e.g. Greek and Latin in
            both small sets) is taken once, from the first archive listed.
        alphabets: keep only these alphabets (optional).
        exclude_alphabets: drop these alphabets (optional).
        characters: ``[start, stop]``, a Python slice over the selected characters in the order
            (archive of first appearance, alphabet, character) (optional); e.g. ``[0, 1200]`` and
            ``[1200, null]`` over both full archives give the Vinyals et al. (2016) split.
        rotations: list from ``[0, 90, 180, 270]`` (default ``[0]``); each rotation of each
            character is its own class, rotated counter-clockwise (``torch.rot90`` with
            ``k = degrees // 90`` over the image dimensions) and named ``".../rot90"``.

    Classes are numbered character by character, and rotation by rotation within a character.

    Args:
        data_dir: folder holding ``omniglot/<archive>.zip`` (``None``: ``$SHAREBONE_DATA_DIR``).
        cache_dir: where decoded archives are cached (``None``: no cache). May differ from
            ``data_dir``, which may be read-only.
        image_size: side of the square images.
        download: download missing archives from the official URLs.
        archives: archive registry (default ``OMNIGLOT_ARCHIVES``).

    Raises:
        DataError (or a subclass): bad spec (unknown key, archive or alphabet; the message
            lists the valid ones), missing/corrupt archives, or an empty selection.
    """
    registry = OMNIGLOT_ARCHIVES if archives is None else archives
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    spec = _as_plain(spec)
    names, keep, exclude, char_slice, rotations = _parse_spec(spec, registry)
    decoded = load_archives(
        [registry[n] for n in dict.fromkeys(names)], data_dir, cache_dir, image_size, download
    )
    selected = _select(decoded, names, keep, exclude, char_slice)
    if not selected:
        raise DataError(f"Split {spec!r} selects no characters")
    return _assemble(decoded, selected, rotations)


def _parse_spec(
    spec: dict[str, Any], registry: Mapping[str, ArchiveSpec]
) -> tuple[list[str], list[str] | None, list[str], slice | None, list[int]]:
    """A split spec's archives, alphabets kept and excluded, character slice and rotations."""
    unknown = sorted(set(spec) - set(SPLIT_KEYS))
    if unknown:
        raise DataError(f"Unknown split key(s) {unknown}; valid keys: {list(SPLIT_KEYS)}")
    names = _str_list(spec, "archives")
    if not names:
        raise DataError(
            f"A split spec needs 'archives': a non-empty list from {sorted(registry)}; got {spec!r}"
        )
    bad = [n for n in names if n not in registry]
    if bad:
        raise DataError(f"Unknown Omniglot archive(s) {bad}; valid: {sorted(registry)}")
    keep = _str_list(spec, "alphabets")
    exclude = _str_list(spec, "exclude_alphabets") or []
    char_slice = _parse_slice(spec["characters"]) if spec.get("characters") is not None else None
    rotations = _parse_rotations(spec.get("rotations"))
    return names, keep, exclude, char_slice, rotations


def _select(
    decoded: Sequence[DecodedArchive],
    names: list[str],
    keep: list[str] | None,
    exclude: list[str],
    char_slice: slice | None,
) -> list[tuple[str, int, int]]:
    """``(name, archive index, character index)`` of the characters a split selects,
    deduplicated by name (the first archive wins), then sliced."""
    available = sorted(
        {c.split("/", 1)[0] for d in decoded for c in d.characters}, key=_natural_key
    )
    bad = [a for a in [*(keep or []), *exclude] if a not in available]
    if bad:
        raise DataError(
            f"Unknown alphabet(s) {bad} in archives {names}; valid alphabets: {available}"
        )
    seen: set[str] = set()
    selected: list[tuple[str, int, int]] = []
    for a, d in enumerate(decoded):
        for c, name in enumerate(d.characters):
            alphabet = name.split("/", 1)[0]
            if name in seen or (keep is not None and alphabet not in keep) or alphabet in exclude:
                continue
            seen.add(name)
            selected.append((name, a, c))
    if char_slice is not None:
        selected = selected[char_slice]
    return selected


def _assemble(
    decoded: Sequence[DecodedArchive], selected: list[tuple[str, int, int]], rotations: list[int]
) -> ImageSet:
    """The selected characters' drawings, each rotation of each character a class."""
    blocks = [
        decoded[a].images[decoded[a].offsets[c] : decoded[a].offsets[c + 1]] for _, a, c in selected
    ]
    counts = torch.tensor([len(b) for b in blocks])
    base = torch.cat(blocks)
    base_labels = torch.repeat_interleave(torch.arange(len(selected)), counts)
    n_rot = len(rotations)
    if n_rot == 1 and rotations[0] == 0:
        images, labels = base, base_labels
    else:
        rotated = torch.stack([torch.rot90(base, r // 90, dims=(2, 3)) for r in rotations])
        labels = (base_labels * n_rot + torch.arange(n_rot).unsqueeze(1)).flatten()
        order = torch.argsort(labels, stable=True)
        images = rotated.flatten(0, 1)[order].contiguous()
        labels = labels[order]
    class_names = [
        name if r == 0 else f"{name}/rot{r}" for name, _, _ in selected for r in rotations
    ]
    return ImageSet(images=images, labels=labels, class_names=class_names)
