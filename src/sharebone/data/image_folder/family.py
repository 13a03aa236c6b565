"""The image-folder task family: classes of images from a folder or a benchmark's own files.

:class:`ImageFolderTasks` checks its settings and serves each split's images and episodes. The
work lies beside it: :mod:`~sharebone.data.image_folder.sources` (where the pixels come from),
:mod:`~sharebone.data.image_folder.splits` (which classes each split holds),
:mod:`~sharebone.data.image_folder.classes` (the class folders) and
:mod:`~sharebone.data.image_folder.cache` (decoding once into a memory-mapped cache).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharebone.data.augment import EpisodeTransform, check_normalize, check_split_augment
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.families import register_family
from sharebone.data.hierarchy import ClassHierarchy, split_hierarchies
from sharebone.data.image_folder.cache import CORRUPT_POLICIES, Decoding, SplitCache
from sharebone.data.image_folder.sources import SOURCES, Sources
from sharebone.data.image_folder.splits import find_split_file
from sharebone.data.images import ImageSet, check_decode_args
from sharebone.errors import SettingError, UnknownNameError

__all__ = ["ImageFolderTasks"]


@register_family("image_folder")
class ImageFolderTasks:
    """Classes of images from a folder (or a benchmark's own files) as few-shot tasks.

    Args:
        root: the data folder (see :mod:`sharebone.data.image_folder` for its layouts).
        splits: split name -> split (a class-list file, a ``.csv``, a list of classes, a
            fraction; null: no such split); default ``{train: 0.64, val: 0.16, test: 0.2}``
            of the classes.
        image_size, channels: the images' side and channels (1 or 3).
        resize: ``stretch`` (the whole image, squeezed to a square) or ``crop`` (centre).
        interpolation: resampling filter (``lanczos``, ``bicubic``, ``bilinear``, ...).
        invert: invert intensities (dark drawings on white become bright on black).
        source: ``folder``, ``mini_imagenet_pickle``, ``tiered_imagenet_pickle``,
            ``cifar100``, a Meta-Dataset release (``aircraft``, ``vgg_flower``, ``fungi``,
            ``quickdraw``, ``traffic_sign``, ``mscoco``) or ``auto``.
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
        max_per_class: ``source: quickdraw`` only: the first this many drawings of each class
            (None: all, as Meta-Dataset).
        roi: ``source: traffic_sign`` only: crop each sign to its box in ``GT-<class>.csv``
            (False: the whole image, as Meta-Dataset).
        hierarchy: the class ontology Meta-Dataset-shaped episodes follow
            (:func:`~sharebone.data.hierarchy.split_hierarchies`): ``groups`` (the
            ``<group>/<class>`` level), or split -> a hierarchy file (found as split files
            are: ILSVRC's WordNet subgraphs in ``tasks/splits/meta_dataset/ilsvrc_2012/``).
    """

    def __init__(self, root: str, splits: Mapping[str, Any] | None = None, image_size: int = 84,
                 channels: int = 3, resize: str = "stretch", interpolation: str = "lanczos",
                 invert: bool = False, source: str = "folder",
                 cache_dir: str | bool | None = None, corrupt: str = "refuse",
                 workers: int | None = None, split_seed: int = 0,
                 group_episodes: bool | Sequence[str] = False,
                 augment: Mapping[str, Any] | None = None,
                 normalize: Mapping[str, Any] | None = None, download: bool = True,
                 max_per_class: int | None = None, roi: bool = False,
                 hierarchy: Any = None) -> None:
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
        splits = {str(k): v for k, v in splits.items() if v is not None}  # null: no split
        if not splits:
            raise SettingError("splits: no split is set; give at least one, e.g. {test: 1.0}.")
        self.image_size, self.channels = image_size, channels
        self.resize, self.interpolation, self.invert = resize, interpolation, bool(invert)
        self.source, self.corrupt, self.download = source, corrupt, download
        self.workers = workers or len(os.sched_getaffinity(0))
        self.split_seed = int(split_seed)
        self._decoding = Decoding(image_size, channels, resize, interpolation, self.invert,
                                  corrupt)
        for key, value, owner in (("max_per_class", max_per_class, "quickdraw"),
                                  ("roi", roi, "traffic_sign")):
            if value not in (None, False) and source != owner:
                raise SettingError(f"task.family.{key} applies to source {owner} only; this "
                                   f"task's source is {source!r}. Remove it.")
        self._sources = Sources(self.root, splits, source, self.split_seed, download,
                                self._decoding, {"max_per_class": max_per_class, "roi": roi})
        if cache_dir is False:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.group_splits = group_splits(group_episodes, self.splits)
        self.hierarchies = split_hierarchies(hierarchy, self.splits,
                                             lambda name: find_split_file(name, self.root))
        self.augment = check_split_augment(augment, list(self.splits))
        self.normalize = check_normalize(normalize, channels)
        self.input_shape = (channels, image_size, image_size)
        self._loaded: dict[str, ImageSet] = {}
        self._where: dict[str, list[str]] = {}

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

    @property
    def splits(self) -> dict[str, Any]:
        """Split name -> split as configured (``source: auto`` may resolve them to the
        root's CSV files)."""
        return self._sources.splits

    def resolved_source(self) -> str:
        """``source``, with ``auto`` resolved by what ``root`` holds."""
        return self._sources.resolved()

    def _load(self, split: str) -> tuple[ImageSet, list[str]]:
        cache = SplitCache(self.cache_dir, self._decoding, self.workers, self.root)
        return cache.load(self._sources.plan(split))

    def input_transform(self, split: str, seed: int) -> EpisodeTransform | None:
        """What turns the split's uint8 batches into model input (None: pixels / 255)."""
        transform = EpisodeTransform(seed, split, self.augment.get(split), self.normalize)
        return transform if transform else None

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> EpisodeSampler:
        data = self.images_for_sampler(split)
        per_way = int(k_shot) + int(q_query) if all(
            isinstance(v, int) for v in (k_shot, q_query)) else None
        if per_way is not None:
            self._check_class_sizes(split, data, per_way, k_shot, q_query)
        hierarchy = self.hierarchies.get(split)
        return EpisodeSampler(data.images, data.labels, n_way, k_shot, q_query, seed=seed,
                              split=split, groups=data.class_groups,
                              group_episodes=self._group_check(split, data),
                              transform=self.input_transform(split, seed),
                              class_names=data.class_names, hierarchy=hierarchy)

    def images_for_sampler(self, split: str) -> ImageSet:
        """The split's images, after the checks that need only its class list: a class
        the split's hierarchy file does not hold is refused before anything is decoded."""
        hierarchy = self.hierarchies.get(split)
        if isinstance(hierarchy, ClassHierarchy):
            plan = self._sources.plan(split)
            if plan.load is None:  # a folder's classes are known without decoding
                hierarchy.check_classes([c.name for c in plan.classes],
                                        f"task.family.hierarchy.{split}")
        return self.images(split)

    def _group_check(self, split: str, data: ImageSet) -> bool:
        for key, splits in (("group_episodes", self.group_splits),
                            ("hierarchy", [s for s, h in self.hierarchies.items()
                                           if h == "groups"])):
            if split in splits and not any(data.class_groups):
                raise SettingError(
                    f"task.family.{key}: the classes of split '{split}' have no groups; give "
                    "them a <group>/<class> folder level or <group>/<class> lines in the "
                    "split file.")
        return split in self.group_splits

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

    def __repr__(self) -> str:
        return (f"ImageFolderTasks(root={str(self.root)!r}, source={self.source!r}, "
                f"splits={sorted(self.splits)}, input_shape={self.input_shape})")
