"""Task families: where episodes of each split come from.

A task family turns ``(split, n_way, k_shot, q_query, seed)`` into an episode source with a
``batch(indices) -> Episode`` method. Image families preload each split once as uint8 tensors
and hand them to :class:`~sharebone.data.episodes.EpisodeSampler`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from sharebone.data.augment import EpisodeTransform, check_split_augment
from sharebone.data.episodes import Episode, EpisodeSampler
from sharebone.data.families import register_family
from sharebone.data.hierarchy import split_hierarchies
from sharebone.data.omniglot import PREPROCESSING as OMNIGLOT_PREPROCESSING
from sharebone.data.omniglot import load_split
from sharebone.errors import SettingError, UnknownNameError


class EpisodeSource(Protocol):
    def batch(self, indices: Any) -> Episode: ...


def prepare_episode(source: Any, episode: Episode) -> Episode:
    """``episode`` of ``source`` (already on the model's device) as the model's float input:
    the source's own ``prepare`` (augmentation, normalisation) where it has one, else
    :meth:`Episode.to_float`. Training, validation and every evaluation go through here, so a
    model sees its inputs the same way wherever they come from."""
    prepare = getattr(source, "prepare", None)
    return prepare(episode) if prepare is not None else episode.to_float()


class TaskFamily(Protocol):
    """Anything that can hand out addressable episodes for a split."""

    input_shape: tuple[int, ...]

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> EpisodeSource: ...


def default_data_dir() -> Path:
    """``$SHAREBONE_DATA_DIR``, else ``./data``."""
    return Path(os.environ.get("SHAREBONE_DATA_DIR", "data")).expanduser()


def default_cache_dir() -> Path:
    """``$SHAREBONE_CACHE_DIR``, else ``~/.cache/sharebone``."""
    return Path(os.environ.get("SHAREBONE_CACHE_DIR", "~/.cache/sharebone")).expanduser()


@register_family("omniglot")
class OmniglotTasks:
    """Omniglot characters as classes, one image split per ``splits`` entry.

    Args:
        splits: split name -> split spec (archives, alphabets, characters, rotations); see
            :func:`sharebone.data.omniglot.load_split` and the files in ``tasks/``.
        data_dir: folder holding ``omniglot/<archive>.zip`` (downloaded there when missing).
        cache_dir: where decoded uint8 tensors are cached.
        image_size: side of the square images fed to the backbone.
        download: fetch missing archives from the official source (md5-checked).
        group_episodes: draw all classes of an episode from one alphabet (Lake et al. 2015's
            within-alphabet episodes), in every split (true) or in the splits listed.
        augment: split -> augmentation (:mod:`sharebone.data.augment`, e.g. ``random_affine``
            for the distortions of handwriting), applied on the device.
        hierarchy: ``groups``: Meta-Dataset-shaped episodes take their classes from one
            alphabet (Meta-Dataset's two-level ontology for Omniglot), in every split, or
            ``{<split>: groups | null}``; N-way episodes are unaffected (``group_episodes``).
    """

    def __init__(self, splits: Mapping[str, Mapping[str, Any]], data_dir: str | None = None,
                 cache_dir: str | None = None, image_size: int = 28, download: bool = True,
                 group_episodes: bool | Sequence[str] = False,
                 augment: Mapping[str, Any] | None = None, hierarchy: Any = None) -> None:
        self.splits = {name: dict(spec) for name, spec in splits.items()}
        self.hierarchies = split_hierarchies(hierarchy, self.splits)
        self.group_splits = group_splits(group_episodes, self.splits)
        self.augment = check_split_augment(augment, list(self.splits))
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.image_size = image_size
        self.download = download
        self.input_shape = (1, image_size, image_size)
        self._loaded: dict[str, Any] = {}

    @classmethod
    def preprocessing(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """How a task of this family reads one image file (a user's own episode folder,
        ``sharebone-eval episode_dir=...``): as Omniglot's drawings are, inverted."""
        return dict(OMNIGLOT_PREPROCESSING)

    def images(self, split: str):
        """The split's :class:`~sharebone.data.images.ImageSet`, decoded once per process."""
        if split not in self.splits:
            raise UnknownNameError(f"Unknown split '{split}'. This task family has: "
                                   f"{sorted(self.splits)}.")
        if split not in self._loaded:
            self._loaded[split] = load_split(self.splits[split], data_dir=self.data_dir,
                                             cache_dir=self.cache_dir, image_size=self.image_size,
                                             download=self.download)
        return self._loaded[split]

    def input_transform(self, split: str, seed: int) -> EpisodeTransform | None:
        """What turns the split's uint8 batches into model input (None: pixels / 255)."""
        augment = self.augment.get(split)
        return EpisodeTransform(seed, split, augment) if augment else None

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> EpisodeSampler:
        data = self.images(split)
        return EpisodeSampler(data.images, data.labels, n_way, k_shot, q_query, seed=seed,
                              split=split, groups=data.class_groups,
                              group_episodes=split in self.group_splits,
                              transform=self.input_transform(split, seed),
                              class_names=data.class_names,
                              hierarchy=self.hierarchies.get(split))


def group_splits(group_episodes: bool | Sequence[str], splits: Sequence[str]) -> set[str]:
    """The splits whose episodes are drawn within one group: all (true), none (false), or
    those listed (each must be one of ``splits``)."""
    if isinstance(group_episodes, bool):
        return set(splits) if group_episodes else set()
    if isinstance(group_episodes, str):
        group_episodes = [group_episodes]
    chosen = {str(s) for s in group_episodes}
    unknown = sorted(chosen - set(splits))
    if unknown:
        raise SettingError(f"group_episodes names split(s) {unknown}; this task has "
                           f"{sorted(splits)}.")
    return chosen


class MetaBatches(torch.utils.data.Dataset):
    """Item ``b`` is meta-batch ``b``: episodes ``[b * size, (b + 1) * size)`` of ``source``.

    Under DDP, rank ``r`` of ``w`` takes its contiguous share of each meta-batch, so the ranks
    together see exactly the episodes one process would.
    """

    def __init__(self, source: EpisodeSource, size: int, length: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if size % world_size:
            raise SettingError(f"meta_batch_size={size} does not split evenly across {world_size} "
                               f"processes; make it a multiple of {world_size}.")
        self.source, self.size, self.length = source, size, length
        self.share = size // world_size
        self.rank = rank

    def __len__(self) -> int:
        return self.length

    def indices(self, b: int) -> torch.Tensor:
        start = b * self.size + self.rank * self.share
        return torch.arange(start, start + self.share)

    def __getitem__(self, b: int) -> Episode:
        return self.source.batch(self.indices(b))


class EpochOffsetSampler(torch.utils.data.Sampler[int]):
    """Yields meta-batch indices ``epoch * n .. epoch * n + n - 1``: fresh episodes each epoch.

    Lightning calls :meth:`set_epoch` before every epoch, so the episode a step sees depends
    only on ``(epoch, step)``, never on what ran before.

    Stateful for exact mid-epoch resume: its whole state is one integer, the next meta-batch
    it would yield (:meth:`state_dict`). After :meth:`load_state_dict`, the epoch that contains
    that meta-batch starts there instead of at its first batch; any other epoch is unaffected.
    """

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.epoch = 0
        self.next_batch = 0
        self.pass_start = 0
        self._resume_at: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # A generator: the range is fixed at the first next(), after Lightning's set_epoch,
        # even when the loader's iterator was created before it (as on resume).
        start = self.epoch * self.num_batches
        stop = start + self.num_batches
        resume_at, self._resume_at = self._resume_at, None
        if resume_at is not None and start <= resume_at <= stop:
            start = resume_at
        self.pass_start = start
        for b in range(start, stop):
            self.next_batch = b + 1
            yield b

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict[str, int]:
        """``{"next_batch": b}``: meta-batches before ``b`` have been handed out."""
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_batch = int(state["next_batch"])
        self._resume_at = self.next_batch


@register_family("synthetic_images")
class SyntheticImageTasks:
    """Generated image classes: no download, for smoke runs and tests.

    Each class is a random binary template; its images are the template with random pixel
    flips, so a backbone can learn something real from them. Deterministic in ``seed``;
    splits get disjoint classes.

    Args:
        classes: split name -> number of classes, e.g. ``{"train": 64, "val": 16, "test": 20}``.
        images_per_class: images of each class.
        image_size, channels: image shape.
        flip: probability of flipping each template pixel in an image.
    """

    def __init__(self, classes: Mapping[str, int], images_per_class: int = 20,
                 image_size: int = 28, channels: int = 1, flip: float = 0.1,
                 seed: int = 0) -> None:
        self.classes = dict(classes)
        self.images_per_class = images_per_class
        self.image_size, self.channels = image_size, channels
        self.flip, self.seed = flip, seed
        self.input_shape = (channels, image_size, image_size)

    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self.classes:
            raise UnknownNameError(f"Unknown split '{split}'. This task family has: "
                                   f"{sorted(self.classes)}.")
        split_index = sorted(self.classes).index(split)
        generator = torch.Generator().manual_seed(self.seed * 1000 + split_index)
        n, m = self.classes[split], self.images_per_class
        shape = (self.channels, self.image_size, self.image_size)
        templates = torch.rand(n, 1, *shape, generator=generator) < 0.3
        flips = torch.rand(n, m, *shape, generator=generator) < self.flip
        images = (templates ^ flips).to(torch.uint8).mul_(255).view(n * m, *shape)
        return images, torch.arange(n).repeat_interleave(m)

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> EpisodeSampler:
        images, labels = self.images(split)
        return EpisodeSampler(images, labels, n_way, k_shot, q_query, seed=seed, split=split)
