"""Decoding one image file into a uint8 array: the preprocessing every image family shares.

Omniglot drawings (:mod:`sharebone.data.omniglot`), folders of photos
(:mod:`sharebone.data.image_folder`) and a user's own episode folder
(:mod:`sharebone.evaluation.folder`) all go through :func:`decode_array`, so an image is read
the same way wherever it comes from:

- refused before decoding when it declares more than :data:`MAX_IMAGE_PIXELS` pixels;
- a JPEG much larger than the target is decoded at a reduced scale (libjpeg's DCT scaling,
  Pillow's ``draft``: 2-8x faster, the same picture);
- turned upright by its EXIF orientation; 16-bit grayscale scaled (not clipped) to 8 bits;
  palette, CMYK and the rest converted; a transparent background composited onto white;
- converted to grayscale (1 channel) or RGB (3), optionally inverted (Omniglot's strokes
  become bright), and resized to a square: ``stretch`` (the whole picture, aspect ratio not
  kept, as Omniglot and miniImageNet's published preprocessing do) or ``crop`` (shorter side to
  the size, centre cropped).

What they decode into is an :class:`ImageSet`: uint8 images sorted by label, with their class
names and groups, ready for episode sampling.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from sharebone.data.archives import DataError
from sharebone.errors import SettingError

#: The most pixels an image may have to be decoded (8192 x 8192). A drawing, or a photo of
#: one, has far fewer; a small file declaring more is a decompression bomb (Pillow itself only
#: refuses beyond twice its ``Image.MAX_IMAGE_PIXELS``, 179 M pixels).
MAX_IMAGE_PIXELS = 1 << 26

#: File suffixes read as images (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

#: How an image becomes a square: the whole picture squeezed, or the centre square of it.
RESIZE_MODES = ("stretch", "crop")

#: Resampling filters by name.
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

#: The errors decoding a broken file raises (Pillow's, numpy's and ours).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

#: Pillow modes with more than 8 bits per pixel, and the shift that keeps their top 8 bits.
_WIDE_MODES = {"I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I": 8}


def check_decode_args(image_size: int, channels: int, resize: str = "stretch",
                      interpolation: str = "lanczos",
                      keys: Mapping[str, str] | None = None) -> None:
    """Refuse settings :func:`decode_array` cannot honour, naming the setting (``keys``: the
    config key of each argument, e.g. ``{"image_size": "task.image_size"}``)."""
    key = {"image_size": "image_size", "channels": "channels", "resize": "resize",
           "interpolation": "interpolation", **(keys or {})}
    if channels not in (1, 3) or isinstance(channels, bool):
        raise SettingError(f"{key['channels']} must be 1 or 3 (grayscale or RGB), got "
                           f"{channels!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise SettingError(f"{key['image_size']} must be a positive int, got {image_size!r}")
    if image_size * image_size > MAX_IMAGE_PIXELS:  # every image would be a poster
        raise SettingError(f"{key['image_size']}={image_size}: each image would be resized to "
                           f"{image_size}x{image_size} pixels, more than MAX_IMAGE_PIXELS "
                           f"({MAX_IMAGE_PIXELS}); few-shot images are tens to hundreds of "
                           "pixels a side.")
    if resize not in RESIZE_MODES:
        raise SettingError(f"{key['resize']} must be one of {list(RESIZE_MODES)}, got "
                           f"{resize!r}")
    if interpolation not in INTERPOLATIONS:
        raise SettingError(f"{key['interpolation']} must be one of {sorted(INTERPOLATIONS)}, "
                           f"got {interpolation!r}")


def decode_array(source: str | os.PathLike[str] | bytes | np.ndarray, image_size: int,
                 channels: int, invert: bool = False, resize: str = "stretch",
                 interpolation: str = "lanczos") -> np.ndarray:
    """One image as uint8 ``[H, W]`` (1 channel) or ``[H, W, 3]``, ``H = W = image_size``.

    Args:
        source: a path, the file's bytes, or an already decoded uint8 ``[H, W]`` / ``[H, W, 3]``
            array (a pickled dataset's pixels), which only gets converted and resized.
        image_size, channels: the output's side and channels (1: grayscale, 3: RGB).
        invert: invert intensities (Omniglot: dark strokes become bright).
        resize: ``stretch`` or ``crop`` (see the module docstring).
        interpolation: resampling filter, a key of :data:`INTERPOLATIONS`.

    Raises:
        OSError, SyntaxError, ValueError, DecompressionBombError (:data:`DECODE_ERRORS`): the
        image cannot be decoded or is too large. :func:`load_image` turns them into a
        :class:`DataError` that names the file.
    """
    check_decode_args(image_size, channels, resize, interpolation)
    if isinstance(source, np.ndarray):
        return _finish(Image.fromarray(source), image_size, channels, invert, resize,
                       interpolation)
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(fp) as img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} pixels is larger than the {MAX_IMAGE_PIXELS:,} pixels "
                "sharebone decodes (sharebone.data.images.MAX_IMAGE_PIXELS); scale it down"
            )
        if img.format == "JPEG" and min(img.size) >= 2 * image_size:
            img.draft(img.mode, (image_size, image_size))  # scale 1/2..1/8, both sides >= size
        img.load()
        if img.format != "PNG" or "exif" in img.info or "Raw profile type exif" in img.info:
            ImageOps.exif_transpose(img, in_place=True)  # a phone photo: sideways plus a tag
        return _finish(img, image_size, channels, invert, resize, interpolation)


def _finish(img: Image.Image, image_size: int, channels: int, invert: bool, resize: str,
            interpolation: str) -> np.ndarray:
    if img.mode in _WIDE_MODES:
        img = _to_8_bit(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent background (common in user drawings): composite onto white.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if invert:
        img = ImageOps.invert(img)
    if resize == "crop" and img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), INTERPOLATIONS[interpolation])
    return np.asarray(img, dtype=np.uint8)


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image as ``L``, keeping its top 8 bits.

    Pillow's own ``convert("L")`` clips such values to 255, which turns a 16-bit drawing into a
    blank page. Values of mode ``I`` are taken as 16-bit when any exceeds 255 (how Pillow reads
    16-bit PGM), else as 8-bit. A transparent value becomes an alpha channel.
    """
    pixels = np.asarray(img).astype(np.int64)
    shift = _WIDE_MODES[img.mode] if img.mode != "I" or pixels.max(initial=0) > 255 else 0
    gray = Image.fromarray((np.clip(pixels, 0, 65535) >> shift).clip(0, 255).astype(np.uint8))
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        alpha = Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8))
        gray = Image.merge("LA", (gray, alpha))
    return gray


def to_chw(array: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, C]`` -> ``[C, H, W]`` (a view where possible)."""
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image(
    source: str | os.PathLike[str] | bytes,
    image_size: int = 28,
    channels: int = 1,
    *,
    invert: bool = False,
    resize: str = "stretch",
    interpolation: str = "lanczos",
) -> torch.Tensor:
    """Decode one image: uint8 ``[channels, image_size, image_size]``.

    Nothing is inverted unless asked: ``invert=True`` is Omniglot's preprocessing (dark strokes
    on a light background become bright strokes on 0; its loaders pass it,
    :data:`sharebone.data.omniglot.PREPROCESSING`); ``channels=3`` for colour photos. Use the
    same settings as the training data for one's own images so that they match it. See
    :func:`decode_array` for every step.

    Raises:
        DataError: the image cannot be decoded, or has more than :data:`MAX_IMAGE_PIXELS`.
    """
    check_decode_args(image_size, channels, resize, interpolation)
    try:
        array = decode_array(source, image_size, channels, invert, resize, interpolation)
    except DECODE_ERRORS as e:
        where = "image bytes" if isinstance(source, bytes | bytearray) else str(source)
        raise DataError(
            f"Cannot decode {where} as an image ({e}). Fix: re-save it as a PNG (or JPEG), or "
            "remove it."
        ) from e
    return torch.from_numpy(np.array(to_chw(array), order="C"))  # a writable copy


# ----------------------------------------------------------------------------------- ImageSet


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set held in memory, ready for episode sampling by tensor indexing.

    Attributes:
        images: uint8 ``[N, C, H, W]``, pixel values 0..255, sorted by label.
        labels: int64 ``[N]``, classes ``0 .. n_classes - 1``, each present, non-decreasing.
        class_names: ``class_names[c]`` names class ``c`` (e.g. ``"Greek/character01"``).
        groups: ``groups[c]``, the group class ``c`` belongs to (an Omniglot alphabet, a
            tieredImageNet category, a folder above the class folders), for episodes drawn
            within one group; None: the first part of each class name before a ``/`` (the
            alphabet of ``"Greek/character01"``), or the class itself when it has none.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise SettingError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise SettingError(
                f"labels must be int64 [N] with N={self.images.shape[0]}, got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        n = len(self.class_names)
        if len(self.labels) and bool((self.labels[1:] < self.labels[:-1]).any()):
            raise SettingError("images must be sorted by label")
        if len(self.labels) and (int(self.labels[0]) != 0 or int(self.labels[-1]) != n - 1):
            raise SettingError(f"labels must span 0..{n - 1} (one per class name)")
        if len(self.labels) == 0 and n:
            raise SettingError("an empty image set has no classes")
        if n and not bool((self.class_counts > 0).all()):
            raise SettingError("every class must have at least one image")
        if self.groups is not None and len(self.groups) != n:
            raise SettingError(f"groups must name one group per class ({n}), got "
                               f"{len(self.groups)}")

    @property
    def class_groups(self) -> list[str]:
        """The group of every class (see ``groups``)."""
        if self.groups is not None:
            return list(self.groups)
        return [name.split("/", 1)[0] for name in self.class_names]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> torch.Tensor:
        """int64 ``[n_classes]``: number of images of each class."""
        return torch.bincount(self.labels, minlength=self.n_classes)

    @property
    def class_offsets(self) -> torch.Tensor:
        """int64 ``[n_classes + 1]``: class ``c`` is ``images[offsets[c] : offsets[c + 1]]``."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.class_counts.cumsum(0)])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageSet(images={tuple(self.images.shape)} uint8, n_classes={self.n_classes}, "
            f"first={self.class_names[:1]})"
        )
