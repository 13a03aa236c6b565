"""A user's own few-shot episode from a folder of images.

    my_episode/
      support/<class>/*.png     labelled examples, at least one per class
      query/<class>/*.png       images to classify (their folder is the true class), and/or
      query/*.png               unlabelled images to classify
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sharebone.data.episodes import Episode
from sharebone.data.omniglot import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class EpisodeFolderError(ValueError):
    """The folder does not describe a usable episode; the message says how to fix it."""


@dataclass(frozen=True)
class FolderEpisode:
    """The episode (one task, batched as ``T=1``), with names to report predictions by."""

    episode: Episode
    class_names: list[str]
    query_paths: list[Path]
    #: True class of each query image, or -1 where it is unlabelled.
    query_targets: torch.Tensor


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_episode_folder(root: str | Path, image_size: int, channels: int = 1) -> FolderEpisode:
    """Read ``support/`` and ``query/`` with the training data's preprocessing."""
    root = Path(root).expanduser()
    support_dir, query_dir = root / "support", root / "query"
    for d in (support_dir, query_dir):
        if not d.is_dir():
            raise EpisodeFolderError(
                f"{d} is missing. An episode folder holds support/<class>/*.png (labelled "
                f"examples) and query/<class>/*.png or query/*.png (images to classify).")
    classes = sorted(p for p in support_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise EpisodeFolderError(f"{support_dir} has {len(classes)} class folder(s); a few-shot "
                                 "episode needs at least 2 (support/<class>/*.png).")
    names = [c.name for c in classes]
    support, support_labels = [], []
    for label, folder in enumerate(classes):
        files = _images(folder)
        if not files:
            raise EpisodeFolderError(f"Support class '{folder.name}' ({folder}) has no images "
                                     f"({', '.join(IMAGE_SUFFIXES)}). Add at least one or remove "
                                     "the folder.")
        support += [load_image(f, image_size, channels) for f in files]
        support_labels += [label] * len(files)

    query, targets, paths = [], [], []
    for path in _images(query_dir):
        query.append(load_image(path, image_size, channels))
        targets.append(-1)
        paths.append(path)
    for folder in sorted(p for p in query_dir.iterdir() if p.is_dir()):
        if folder.name not in names:
            raise EpisodeFolderError(
                f"Query class '{folder.name}' has no support examples: support/ has "
                f"{', '.join(names)}. Rename the query folder or add support/{folder.name}/.")
        files = _images(folder)
        if not files:
            raise EpisodeFolderError(f"Query class folder {folder} is empty; add images or "
                                     "remove it.")
        for path in files:
            query.append(load_image(path, image_size, channels))
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
    return FolderEpisode(episode, names, paths, query_targets)
