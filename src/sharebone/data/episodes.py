"""Addressable N-way K-shot Q-query episodes, built by tensor indexing.

Episode ``i`` of a split under seed ``s`` is a pure function of ``(s, split, i)``: the random
choices come from a counter-based hash of those three numbers (no generator state is carried
between episodes). So the same episode comes out on any machine, in any order, in any batch,
on any DDP rank; resuming needs only the next episode index; and every regime is evaluated on
the very same test episodes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sharebone.errors import SettingError, check_count
from sharebone.memory import empty_huge

__all__ = ["Episode", "EpisodeSampler", "RaggedEpisodes", "split_id", "hash_keys", "uniform"]

_MASK = (1 << 64) - 1

#: ``hash_keys`` streams: 0 and 1 draw an episode's classes and images, 2 its group (episodes
#: within one group), 3 the random parameters of its data augmentation, 4 those of its random
#: affine maps.
GROUP_STREAM, AUGMENT_STREAM, AFFINE_STREAM = 2, 3, 4


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores."""
    x &= _MASK
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    # torch's >> is arithmetic on int64; mask to get the logical shift splitmix64 needs.
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def split_id(split: str) -> int:
    """A stable integer for a split name (``zlib.crc32``, identical on every machine)."""
    return zlib.crc32(split.encode())


def _splitmix64_int(x: int) -> int:
    """The same finaliser on a Python int, for the per-call scalar part of the hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return _signed(x ^ (x >> 31))


@functools.lru_cache(maxsize=64)
def _counter_keys(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return _splitmix64(torch.arange(n, dtype=torch.int64, device=device)).view(1, *shape)


def hash_keys(seed: int, split: str, episodes: torch.Tensor, stream: int,
              shape: Sequence[int]) -> torch.Tensor:
    """Random int64 keys ``[len(episodes), *shape]``, a pure function of all the arguments.

    Sorting keys gives a uniformly random permutation; ``stream`` separates independent uses
    (class choice, sample choice) within one episode. The keys are computed on the device of
    ``episodes`` and are the same on every device (integer arithmetic only).
    """
    base = _splitmix64_int(seed & _MASK)
    base = _splitmix64_int(_splitmix64_int(base ^ split_id(split)) ^ stream)
    per_episode = _splitmix64(episodes.to(torch.int64) ^ base)
    per_episode = per_episode.view(-1, *([1] * len(shape)))
    return _splitmix64(per_episode ^ _counter_keys(tuple(shape), per_episode.device))


def uniform(seed: int, split: str, episodes: torch.Tensor, stream: int,
            shape: Sequence[int]) -> torch.Tensor:
    """Float64 numbers in ``[0, 1)``, ``[len(episodes), *shape]``: :func:`hash_keys` turned into
    uniform draws (the top 53 bits of each key), as addressable as the keys."""
    keys = hash_keys(seed, split, episodes, stream, shape)
    return _shr(keys, 11).to(torch.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Episode:
    """One few-shot task, or a meta-batch of them stacked on a leading ``tasks`` dimension.

    Shapes (``T`` tasks; absent for a single episode):

    - ``support``: ``[T, n_way * k_shot, C, H, W]``, ordered by way, then shot;
    - ``support_labels``: ``[T, n_way * k_shot]``, int64 in ``0..n_way-1``;
    - ``query``: ``[T, n_way * q_query, C, H, W]``, ordered by way, then query;
    - ``query_labels``: ``[T, n_way * q_query]``;
    - ``classes``: ``[T, n_way]``, the dataset class of each way (label ``j`` is class
      ``classes[..., j]``).

    Images stay uint8 until they reach the model's device (``to_float``); 4x less to copy.

    Regression tasks (sinusoid, synthetic regression) have one "way": ``support``/``query``
    are inputs ``[T, M, *input]`` and the labels float targets ``[T, M, 1]``, the shape of the
    predictions (one output per example), so a loss never broadcasts one against the other
    (:mod:`sharebone.task_kind`).
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    #: int64 ``[T]`` (a 0-d tensor for a single episode): which episode of its sampler each
    #: task is. It stays on the CPU (``to`` leaves it there) and seeds the random draws of data
    #: augmentation, so an augmented episode is as addressable as the episode itself. None for
    #: an episode that did not come from a sampler (a folder episode).
    index: torch.Tensor | None = None
    #: The source each task was drawn from (many sources in one run), else None.
    sources: tuple[str, ...] | None = None

    @property
    def n_way(self) -> int:
        return self.classes.shape[-1]

    @property
    def num_tasks(self) -> int:
        return self.classes.shape[0] if self.classes.dim() == 2 else 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        return Episode(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()),
                       index=self.index, sources=self.sources)

    def to_float(self) -> Episode:
        """uint8 images in ``[0, 255]`` -> float in ``[0, 1]``; other dtypes unchanged."""

        def convert(t: torch.Tensor) -> torch.Tensor:
            if t.dtype != torch.uint8:
                return t
            if t.device.type != "cpu":
                return t.float().div_(255)
            return empty_huge(tuple(t.shape), torch.float32).copy_(t).div_(255)  # see _gather

        return Episode(convert(self.support), self.support_labels, convert(self.query),
                       self.query_labels, self.classes, self.index, self.sources)

    def task(self, t: int) -> Episode:
        """Task ``t`` of a meta-batch, as a single episode."""
        return Episode(*(x[t] for x in self._tensors()),
                       index=None if self.index is None else self.index[t],
                       sources=None if self.sources is None else (self.sources[t],))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.support, self.support_labels, self.query, self.query_labels, self.classes)


@dataclass(frozen=True)
class RaggedEpisodes:
    """A meta-batch of episodes of different shapes (ways, shots, queries per task), ragged.

    Each tensor holds every task's rows one after the other, nothing padded: ``support``
    ``[sum S_t, C, H, W]`` (task by task, each way-major), ``support_labels`` ``[sum S_t]`` in
    ``0..ways[t]-1``, ``query``/``query_labels`` likewise, ``classes`` ``[sum ways]`` (the
    dataset class of each way). ``ways``, ``support_sizes`` and ``query_sizes`` (int64
    ``[T]``, on the CPU: they are the slicing) say where each task's rows are. A meta-batch
    is one gather (exactly the bytes the tasks hold) and one host-to-device copy per
    tensor; :meth:`tasks` hands each task to a regime as an :class:`Episode` meta-batch of
    one (views, no copy). ``sources``: the source each task
    was drawn from (many sources in one run), else None. (``support`` and ``query`` may be
    views of one buffer: the sampler gathers a meta-batch's rows in one call.)
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    ways: torch.Tensor
    support_sizes: torch.Tensor
    query_sizes: torch.Tensor
    index: torch.Tensor | None = None
    sources: tuple[str, ...] | None = None

    @property
    def num_tasks(self) -> int:
        return int(self.ways.numel())

    def _splits(self) -> tuple[list[int], list[int], list[int]]:
        return self.ways.tolist(), self.support_sizes.tolist(), self.query_sizes.tolist()

    def tasks(self) -> list[Episode]:
        """Every task as an :class:`Episode` meta-batch of one (``[1, S_t, ...]``), views."""
        ways, shots, queries = self._splits()
        parts = zip(self.support.split(shots), self.support_labels.split(shots),
                    self.query.split(queries), self.query_labels.split(queries),
                    self.classes.split(ways), strict=True)
        index = [None] * len(ways) if self.index is None else self.index.split(1)
        sources = [None] * len(ways) if self.sources is None else [(n,) for n in self.sources]
        return [Episode(*(x.unsqueeze(0) for x in part), index=i, sources=n)
                for part, i, n in zip(parts, index, sources, strict=True)]

    def task(self, t: int) -> Episode:
        """Task ``t`` as a single episode (no tasks dimension), as ``Episode.task`` gives."""
        return self.tasks()[t].task(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RaggedEpisodes:
        moved = (t.to(device, non_blocking=non_blocking) for t in
                 (self.support, self.support_labels, self.query, self.query_labels,
                  self.classes))
        return RaggedEpisodes(*moved, self.ways, self.support_sizes, self.query_sizes,
                              self.index, self.sources)

    def to_float(self) -> RaggedEpisodes:
        """uint8 images -> floats in ``[0, 1]``, in one conversion for the whole meta-batch."""
        as_float = Episode(self.support, self.support_labels, self.query, self.query_labels,
                           self.classes).to_float()
        return dataclasses.replace(self, support=as_float.support, query=as_float.query)

    def map(self, fn: Callable[[Episode], Episode]) -> RaggedEpisodes:
        """``fn`` (a split's augmentation, say) applied to every task; the results joined."""
        done = [fn(task) for task in self.tasks()]
        return dataclasses.replace(
            self, support=torch.cat([e.support[0] for e in done]),
            query=torch.cat([e.query[0] for e in done]))


class EpisodeSampler:
    """Builds N-way K-shot Q-query episodes from class-indexed, preloaded images.

    Args:
        images: ``[N, C, H, W]`` tensor (uint8 for images), in memory or memory-mapped. Sorted
            by label, it is used as it is (no copy: episodes read only the rows they need, so a
            memory-mapped cache is never read whole); otherwise a sorted copy is made.
        labels: ``[N]`` int64 class of each image, classes ``0..n_classes-1``.
        n_way, k_shot, q_query: ways, support shots and query examples per way.
        seed: the run's seed; with ``split`` it names an infinite, fixed sequence of episodes.
        split: the split's name ("train", "val", "test"); different splits give different
            episodes even under one seed.
        groups: the group of every class (indexed by label): names, or int64 ids. Classes of
            one group are related (an Omniglot alphabet, a tieredImageNet category).
        group_episodes: draw all ``n_way`` classes of an episode from one group: first a group,
            uniformly among those with at least ``n_way`` classes, then ``n_way`` of its
            classes (Lake et al. 2015's within-alphabet episodes). Needs ``groups``.
        transform: what :meth:`prepare` applies to an episode on the model's device (data
            augmentation, normalisation; :class:`sharebone.data.augment.EpisodeTransform`);
            None: uint8 pixels become floats in ``[0, 1]``.
        class_names: the name of every class (indexed by label: a folder's name, an Omniglot
            ``alphabet/character``), for figures and predictions; None: ``class <label>``.
        hierarchy: the split's class ontology, which Meta-Dataset-shaped episodes follow
            (:class:`sharebone.data.variable.VariableEpisodeSampler`; N-way episodes draw
            their classes uniformly, as Meta-Dataset's do): a
            :class:`~sharebone.data.hierarchy.ClassHierarchy` (ILSVRC's WordNet graph), or
            ``"groups"`` (``groups`` as a two-level ontology: Omniglot's alphabets).

    Episodes are drawn on the device that holds ``images``: :meth:`to` moves a sampler (its
    images and index tables) to a GPU, where a meta-batch then costs no host-to-device copy.

    Example:
        >>> images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
        >>> sampler = EpisodeSampler(images, torch.arange(40) // 10, n_way=2, k_shot=1, q_query=3)
        >>> episode = sampler.batch(range(4))
        >>> tuple(episode.support.shape), tuple(episode.query.shape)
        ((4, 2, 1, 1, 1), (4, 6, 1, 1, 1))
        >>> torch.equal(sampler[2].query, episode.query[2])  # episode 2 is episode 2
        True
        >>> within = EpisodeSampler(images, torch.arange(40) // 10, 2, 1, 3,
        ...                         groups=["a", "a", "b", "b"], group_episodes=True)
        >>> sorted({tuple(c) for c in within.batch(range(50)).classes.tolist()})
        [(0, 1), (1, 0), (2, 3), (3, 2)]
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n_way: int, k_shot: int,
                 q_query: int, seed: int = 0, split: str = "train", *,
                 groups: Sequence[str] | torch.Tensor | None = None,
                 group_episodes: bool = False,
                 transform: Callable[[Episode], Episode] | None = None,
                 class_names: Sequence[str] | None = None,
                 hierarchy: Any = None) -> None:
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        if hierarchy == "groups" and groups is None:
            raise SettingError(f"hierarchy: groups needs the group of every class of split "
                               f"'{split}', and none were given.")
        self.hierarchy = hierarchy
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.shape[0] != labels.shape[0]:
            raise SettingError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        # An empty query set would score every episode as NaN: refused like an empty support.
        n_way, k_shot = check_count("n_way", n_way), check_count("k_shot", k_shot)
        q_query = check_count("q_query", q_query)
        if labels.numel() and bool((labels[1:] < labels[:-1]).any()):
            order = torch.argsort(labels, stable=True)
            self.images = images[order]
            labels = labels[order]
        else:  # already sorted (a cache is): keep the tensor itself, memory-mapped or not
            self.images = images
        counts = torch.bincount(labels)
        present = counts > 0
        n_classes = int(present.sum())
        if n_way > n_classes:
            raise SettingError(
                f"{n_way}-way episodes need {n_way} classes, but split '{split}' has only "
                f"{n_classes}. Lower n_way to at most {n_classes} or use a split with more classes."
            )
        self.class_ids = torch.nonzero(present).squeeze(1)  # position -> dataset class
        counts = counts[present]
        per_way = k_shot + q_query
        fewest = int(counts.min())
        if per_way > fewest:
            raise SettingError(
                f"k_shot + q_query = {k_shot} + {q_query} = {per_way} images per class, but the "
                f"smallest class of split '{split}' has only {fewest}. Lower k_shot or q_query so "
                f"that k_shot + q_query <= {fewest}."
            )
        self.n_way, self.k_shot, self.q_query = int(n_way), int(k_shot), int(q_query)
        self.seed, self.split = int(seed), split
        self.n_classes = n_classes
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.max_count, self.min_count = int(counts.max()), fewest
        self.transform = transform
        self.group_episodes = bool(group_episodes)
        self._init_groups(groups)
        # Way-major layout of each episode: first k_shot of every way go to support.
        self._support_labels = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        self._query_labels = torch.arange(self.n_way).repeat_interleave(self.q_query)

    def _init_groups(self, groups: Sequence[str] | torch.Tensor | None) -> None:
        self.group_names: list[str] | None = None
        self.class_group: torch.Tensor | None = None  # position -> group id
        if groups is None:
            if self.group_episodes:
                raise SettingError(f"group_episodes needs the group of every class of split "
                                   f"'{self.split}', and none were given.")
            return
        if isinstance(groups, torch.Tensor):
            ids = groups.to(torch.int64)
        else:
            names = [str(g) for g in groups]
            self.group_names = list(dict.fromkeys(names))
            index = {name: i for i, name in enumerate(self.group_names)}
            ids = torch.tensor([index[g] for g in names], dtype=torch.int64)
        if ids.dim() != 1 or ids.numel() <= int(self.class_ids.max()):
            raise SettingError(f"groups must give the group of each of the "
                               f"{int(self.class_ids.max()) + 1} classes of split "
                               f"'{self.split}', got {tuple(ids.shape)}.")
        self.class_group = ids[self.class_ids]
        sizes = torch.bincount(self.class_group)
        self.eligible_groups = torch.nonzero(sizes >= self.n_way).squeeze(1)
        if self.group_episodes and self.eligible_groups.numel() == 0:
            largest = int(sizes.argmax())
            name = self.group_names[largest] if self.group_names else str(largest)
            raise SettingError(
                f"{self.n_way}-way episodes within one group need a group of at least "
                f"{self.n_way} classes, but the largest group of split '{self.split}' "
                f"('{name}') has only {int(sizes.max())}. Lower n_way to at most "
                f"{int(sizes.max())}, or turn group_episodes off for this split.")

    #: The tensors :meth:`to` moves: everything :meth:`batch` indexes with or into.
    _ON_DEVICE = ("images", "class_ids", "counts", "offsets", "class_group", "eligible_groups",
                  "_support_labels", "_query_labels")

    @property
    def device(self) -> torch.device:
        """Where this sampler's images are, and so where its episodes are drawn."""
        return self.images.device

    @property
    def nbytes(self) -> int:
        """The size of the split's images (what moving them to a device costs there)."""
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str) -> EpisodeSampler:
        """This sampler with its images and index tables on ``device`` (a new sampler; this one
        is unchanged). It draws the very same episodes there: the keys are integer arithmetic,
        identical on every device; ``Episode.index`` stays on the CPU, as always."""
        moved = copy.copy(self)
        for name in self._ON_DEVICE:
            value = getattr(self, name, None)
            if value is not None:
                setattr(moved, name, value.to(device))
        return moved

    def class_name(self, label: int) -> str:
        """The name of dataset class ``label`` (``Episode.classes`` holds these labels)."""
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else f"class {label}"

    def prepare(self, episode: Episode) -> Episode:
        """An episode of this sampler (moved to any device) as the model's float input: the
        split's ``transform`` (augmentation, normalisation) where there is one, else pixels
        in ``[0, 1]``."""
        return episode.to_float() if self.transform is None else self.transform(episode)

    def __getitem__(self, index: int) -> Episode:
        return self.batch([index]).task(0)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> Episode:
        """The episodes at ``indices`` stacked as one meta-batch (see :class:`Episode`)."""
        episodes = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if episodes.numel() and int(episodes.min()) < 0:
            raise IndexError("Episode indices must be >= 0.")
        tasks = episodes.numel()
        keyed = episodes.to(self.images.device)  # drawn where the images are; index stays here
        # Ways: the n_way classes with the smallest keys, a uniform draw without replacement.
        class_keys = hash_keys(self.seed, self.split, keyed, 0, (self.n_classes,))
        if self.group_episodes:
            # One group per episode (the eligible group with the smallest key); the classes of
            # every other group sort last.
            group_keys = hash_keys(self.seed, self.split, keyed, GROUP_STREAM,
                                   (self.eligible_groups.numel(),))
            chosen = self.eligible_groups[group_keys.argmin(dim=1)]
            outside = self.class_group.unsqueeze(0) != chosen.unsqueeze(1)
            class_keys = class_keys.masked_fill(outside, torch.iinfo(torch.int64).max)
        classes = torch.topk(class_keys, self.n_way, dim=1, largest=False, sorted=True).indices
        # Images: per way, sort random keys over the class's images; padded slots sort last.
        sample_keys = hash_keys(self.seed, self.split, keyed, 1, (self.n_way, self.max_count))
        per_way = self.k_shot + self.q_query
        counts = self.counts[classes]
        if self.max_count != self.min_count:
            slot = torch.arange(self.max_count, device=counts.device)
            padding = slot >= counts.unsqueeze(-1)
            sample_keys = sample_keys.masked_fill(padding, torch.iinfo(torch.int64).max)
        picks = torch.topk(sample_keys, per_way, dim=2, largest=False, sorted=True).indices
        rows = self.offsets[classes].unsqueeze(-1) + picks  # [T, n_way, k_shot + q_query]
        # index_select copies whole rows; it is ~25x faster than advanced indexing here. One
        # call each for support and query puts the rows straight where they belong (no second
        # copy to split them: at 84x84x3 a meta-batch of 32 5-way 5-shot 15-query is 68 MB),
        # into memory on huge pages: faulting in fresh 4 KiB pages cost more than the copy.
        support = self._gather(rows[:, :, : self.k_shot], (tasks, self.n_way * self.k_shot))
        query = self._gather(rows[:, :, self.k_shot :], (tasks, self.n_way * self.q_query))
        return Episode(
            support=support,
            support_labels=self._support_labels.expand(tasks, -1),
            query=query,
            query_labels=self._query_labels.expand(tasks, -1),
            classes=self.class_ids[classes],
            index=episodes,
        )

    def _gather(self, rows: torch.Tensor, lead: tuple[int, int]) -> torch.Tensor:
        """``images[rows]`` as ``[*lead, *image shape]``: one copy, into a fresh buffer."""
        shape = (*lead, *self.images.shape[1:])
        if self.images.device.type != "cpu":
            return self.images.index_select(0, rows.reshape(-1)).view(shape)  # rows: there too
        out = empty_huge((rows.numel(), *self.images.shape[1:]), self.images.dtype)
        return torch.index_select(self.images, 0, rows.reshape(-1), out=out).view(shape)

    def __repr__(self) -> str:
        within = ", group_episodes=True" if self.group_episodes else ""
        return (f"EpisodeSampler(split={self.split!r}, seed={self.seed}, n_way={self.n_way}, "
                f"k_shot={self.k_shot}, q_query={self.q_query}, n_classes={self.n_classes}"
                f"{within})")
