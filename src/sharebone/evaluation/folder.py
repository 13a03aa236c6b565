"""A user's own few-shot episode from a folder of images.

    my_episode/
      support/<class>/*.png     labelled examples, at least one per class
      query/<class>/*.png       images to classify (their folder is the true class), and/or
      query/*.png               unlabelled images to classify

Hidden entries (names starting with ``.``: ``.ipynb_checkpoints/``, ``.DS_Store``, macOS ``._x``
files) are ignored. Names that are not valid UTF-8 are read all the same and shown with U+FFFD in
their place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharebone.data.episodes import Episode
from sharebone.data.images import IMAGE_SUFFIXES, load_image
from sharebone.errors import SettingError


class EpisodeFolderError(SettingError):
    """The folder does not describe a usable episode; the message says how to fix it."""


@dataclass(frozen=True)
class FolderEpisode:
    """The episode (one task, batched as ``T=1``), with names to report predictions by."""

    episode: Episode
    #: The class folders' names, printable (see :func:`display_name`).
    class_names: list[str]
    query_paths: list[Path]
    #: True class of each query image, or -1 where it is unlabelled.
    query_targets: torch.Tensor

    @property
    def query_names(self) -> list[str]:
        """The query paths, printable (see :func:`display_name`)."""
        return [display_name(p) for p in self.query_paths]


def display_name(path: str | Path) -> str:
    """``path`` as text that can be printed and written as UTF-8: bytes of a file name that are
    not UTF-8 (kept by Python as lone surrogates, which no UTF-8 stream accepts) become U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def load_episode_folder(root: str | Path, image_size: int, channels: int = 1,
                        **preprocessing: Any) -> FolderEpisode:
    """Read ``support/`` and ``query/`` with the training data's preprocessing.

    ``preprocessing``: :func:`~sharebone.data.images.load_image`'s keyword settings (``invert``,
    ``resize``, ``interpolation``); for an Omniglot task, its
    :data:`~sharebone.data.omniglot.PREPROCESSING` (``invert=True``). Nothing is inverted by
    default.
    """
    root = Path(root).expanduser()

    def load(path: Path) -> torch.Tensor:
        return load_image(path, image_size, channels, **preprocessing)

    support_dir, query_dir = root / "support", root / "query"
    for d in (support_dir, query_dir):
        if not d.is_dir():
            raise EpisodeFolderError(
                f"{d} is missing. An episode folder holds support/<class>/*.png (labelled "
                f"examples) and query/<class>/*.png or query/*.png (images to classify).")
    classes = [p for p in _visible(support_dir) if p.is_dir()]
    stray = _images(support_dir)
    if stray:
        raise EpisodeFolderError(
            f"{display_name(stray[0])} is not in a class folder ({len(stray)} such image(s) in "
            f"{display_name(support_dir)}): a support image's folder is its label. Fix: move it "
            "to support/<class>/.")
    if len(classes) < 2:
        raise EpisodeFolderError(f"{support_dir} has {len(classes)} class folder(s); a few-shot "
                                 "episode needs at least 2 (support/<class>/*.png).")
    names = [c.name for c in classes]  # as on disk, to match query folders by
    support, support_labels = [], []
    for label, folder in enumerate(classes):
        files = _images(folder)
        if not files:
            raise EpisodeFolderError(f"Support class '{display_name(folder.name)}' "
                                     f"({display_name(folder)}) has no images "
                                     f"({', '.join(IMAGE_SUFFIXES)}). Add at least one or remove "
                                     "the folder.")
        support += [load(f) for f in files]
        support_labels += [label] * len(files)

    query, targets, paths = [], [], []
    for path in _images(query_dir):
        query.append(load(path))
        targets.append(-1)
        paths.append(path)
    shown = [display_name(n) for n in names]
    for folder in (p for p in _visible(query_dir) if p.is_dir()):
        if folder.name not in names:
            name = display_name(folder.name)
            raise EpisodeFolderError(
                f"Query class '{name}' has no support examples: support/ has "
                f"{', '.join(shown)}. Rename the query folder or add support/{name}/.")
        files = _images(folder)
        if not files:
            raise EpisodeFolderError(f"Query class folder {display_name(folder)} is empty; "
                                     "add images or remove it.")
        for path in files:
            query.append(load(path))
            targets.append(names.index(folder.name))
            paths.append(path)
    if not query:
        raise EpisodeFolderError(f"{query_dir} has no images to classify.")
    query_targets = torch.tensor(targets)
    episode = Episode(
        support=torch.stack(support).unsqueeze(0),
        support_labels=torch.tensor(support_labels).unsqueeze(0),
        query=torch.stack(query).unsqueeze(0),
        # Unlabelled queries get label 0 here; only query_targets >= 0 are scored.
        query_labels=query_targets.clamp(min=0).unsqueeze(0),
        classes=torch.arange(len(names)).unsqueeze(0),
    )
    return FolderEpisode(episode, shown, paths, query_targets)
