"""Variable-way, variable-shot episodes by Meta-Dataset's rules (Triantafillou et al., ICLR
2020, arXiv:1903.03096, section 3.2 and appendix; ``meta_dataset/data/sampling.py``).

Per episode, from the split's classes:

1. ways ``N ~ U{min_ways .. min(max_ways, classes)}``, then ``N`` classes uniformly; where
   the split has an ontology (``hierarchy``), first a node or group, then its classes
   (:func:`class_pools`: ILSVRC's WordNet nodes, Omniglot's alphabets);
2. queries per class ``q = min(max_query_per_class, floor(0.5 * smallest chosen class))``;
3. support size ``|S| = min(max_support_set_size, sum_c floor(beta * min(max_support_per_class,
   |c| - q) + 1))`` with ``beta ~ U(0, 1)``;
4. shots of class ``c``: ``min(floor(p_c * (|S| - N)) + 1, |c| - q)``, ``p_c`` proportional to
   ``|c| * exp(a_c)``, ``a_c ~ U(min_log_weight, max_log_weight)`` (class imbalance).

Every draw comes from the counter-based hash of :mod:`sharebone.data.episodes`, so episode
``i`` is still a pure function of ``(seed, split, i)``. The shape (ways, shots, queries) is
computed on the CPU (a few hundred numbers, floats included, so it is the same whichever
device holds the images); the images are picked and gathered where they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from sharebone.data.episodes import (
    _MASK,
    GROUP_STREAM,
    Episode,
    EpisodeSampler,
    RaggedEpisodes,
    _splitmix64_int,
    split_id,
)
from sharebone.data.hierarchy import ClassHierarchy
from sharebone.errors import SettingError
from sharebone.memory import empty_huge

__all__ = ["SHAPES", "MetaDatasetShape", "VariableEpisodeSampler", "class_pools", "episode_source"]

#: ``sampler.<split>.shape`` (and a test setting's ``shape``).
SHAPES = ("fixed", "meta_dataset")
#: ``hash_keys`` streams of the shape's draws (0-3 are the fixed sampler's).
WAYS_STREAM, WEIGHT_STREAM = 4, 5


def _np_splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on uint64 arrays (numpy wraps modulo 2**64, shifts are logical)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _np_keys(seed: int, split: str, episodes: np.ndarray, stream: int, n: int) -> np.ndarray:
    base = _splitmix64_int(seed & _MASK)
    base = _splitmix64_int(_splitmix64_int(base ^ split_id(split)) ^ stream) & _MASK
    per_episode = _np_splitmix64(episodes.astype(np.int64).view(np.uint64) ^ np.uint64(base))
    return _np_splitmix64(per_episode[:, None] ^ _np_splitmix64(np.arange(n, dtype=np.uint64)))


def np_hash_keys(seed: int, split: str, episodes: np.ndarray, stream: int,
                 n: int) -> np.ndarray:
    """:func:`~sharebone.data.episodes.hash_keys` ``[len(episodes), n]`` in numpy, bit for
    bit (int64), for the shape's handful of numbers per episode."""
    return _np_keys(seed, split, episodes, stream, n).view(np.int64)


def np_uniform(seed: int, split: str, episodes: np.ndarray, stream: int,
               n: int) -> np.ndarray:
    """:func:`~sharebone.data.episodes.uniform` in numpy: the same float64 draws."""
    keys = _np_keys(seed, split, episodes, stream, n)
    return (keys >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MetaDatasetShape:
    """Meta-Dataset's episode rules; defaults are the paper's (``sampler.meta_dataset``)."""

    min_ways: int = 5
    max_ways: int = 50
    max_support_set_size: int = 500
    max_support_per_class: int = 100
    max_query_per_class: int = 10
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None, key: str = "sampler.meta_dataset"
           ) -> MetaDatasetShape:
        """The rules from a config block, checked; errors name ``<key>.<field>``."""
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise SettingError(f"{key}.{unknown[0]}: not a Meta-Dataset episode rule. Fix: use "
                               f"one of {', '.join(sorted(known))}.")
        values: dict[str, Any] = {}
        for name in known & set(spec):
            value = spec[name]
            kind = float if "log_weight" in name else int
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    kind is int and (not float(value).is_integer() or value < 1)):
                want = "a number" if kind is float else "an integer >= 1"
                raise SettingError(f"{key}.{name} must be {want}, got {value!r}. Fix: set "
                                   f"{key}.{name}=<{want}>.")
            values[name] = kind(value)
        shape = cls(**values)
        shape.check(key)
        return shape

    def check(self, key: str) -> None:
        if self.max_ways < self.min_ways:
            raise SettingError(f"{key}.max_ways={self.max_ways} is below {key}.min_ways="
                               f"{self.min_ways}. Fix: raise max_ways or lower min_ways.")
        if self.max_support_set_size < self.max_ways:
            raise SettingError(
                f"{key}.max_support_set_size={self.max_support_set_size} is smaller than "
                f"{key}.max_ways={self.max_ways}: a {self.max_ways}-way episode needs one "
                f"support image per way. Fix: max_support_set_size >= max_ways.")
        if self.max_log_weight < self.min_log_weight:
            raise SettingError(f"{key}.max_log_weight is below {key}.min_log_weight. Fix: "
                               "swap them.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class VariableEpisodeSampler:
    """Meta-Dataset-shaped episodes of one split, as :class:`RaggedEpisodes` meta-batches.

    Built on a split's :class:`EpisodeSampler` (its images, class counts and offsets; no
    copy), so any image family serves it. ``batch(indices)`` is one hash per draw, one
    ``topk`` over image keys and one gather for the whole meta-batch.

    Example:
        >>> images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1)
        >>> base = EpisodeSampler(images, torch.arange(200) // 20, 1, 1, 1)
        >>> sampler = VariableEpisodeSampler(base, MetaDatasetShape(min_ways=2, max_ways=6))
        >>> batch = sampler.batch(range(3))
        >>> [int(w) for w in batch.ways] == [sampler[i].n_way for i in range(3)]
        True
    """

    def __init__(self, base: EpisodeSampler, shape: MetaDatasetShape,
                 key: str = "sampler.meta_dataset") -> None:
        if base.n_classes < shape.min_ways:
            raise SettingError(
                f"{key}.min_ways={shape.min_ways}, but split '{base.split}' has only "
                f"{base.n_classes} classes. Fix: {key}.min_ways <= {base.n_classes}, or a "
                "split with more classes.")
        self.base, self.shape = base, shape
        self.seed, self.split = base.seed, base.split
        self.transform = base.transform
        self.max_ways = min(shape.max_ways, base.n_classes)
        self._counts_np = base.counts.cpu().numpy()
        self._offsets_np = base.offsets.cpu().numpy()
        self._class_ids = base.class_ids.cpu()
        self.pools, self.pool_ways = class_pools(base, shape.min_ways, key)
        if self.pools is not None:  # pool -> which positions it holds, and how many
            self._members = np.zeros((len(self.pools), base.n_classes), dtype=bool)
            for p, pool in enumerate(self.pools):
                self._members[p, pool] = True
            self._pool_sizes = self._members.sum(1)

    # what the data module and placement ask of a source
    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    @property
    def images(self) -> torch.Tensor:
        return self.base.images

    @property
    def class_names(self) -> list[str] | None:
        return self.base.class_names

    def class_name(self, label: int) -> str:
        return self.base.class_name(label)

    def to(self, device: torch.device | str) -> VariableEpisodeSampler:
        moved = object.__new__(VariableEpisodeSampler)
        moved.__dict__.update(self.__dict__)
        moved.base = self.base.to(device)
        return moved

    def prepare(self, batch: RaggedEpisodes | Episode) -> RaggedEpisodes | Episode:
        """The model's float input (the split's transform per task, if it has one)."""
        if isinstance(batch, Episode) or self.transform is None:
            return self.base.prepare(batch) if isinstance(batch, Episode) else batch.to_float()
        return batch.map(self.transform)

    def __getitem__(self, index: int) -> Episode:
        return self.batch([index]).task(0)

    def draw_shape(self, episodes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(classes [T, W], ways [T], shots [T, W], queries [T])`` on the CPU, ``W`` the
        largest way count (ways past ``ways[t]`` have 0 shots); positions, not class ids."""
        return tuple(torch.from_numpy(x) for x in self._shape(episodes.cpu().numpy()))

    def _shape(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """:meth:`draw_shape` in numpy: a few hundred numbers, where torch's per-op cost
        would be most of a meta-batch of one (:func:`np_hash_keys` gives :func:`hash_keys`'
        very bits)."""
        s, seed, split = self.shape, self.seed, self.split
        draws = np_uniform(seed, split, index, WAYS_STREAM, 2)
        keys = np_hash_keys(seed, split, index, 0, len(self._counts_np))
        if self.pools is None:
            span = self.max_ways - s.min_ways + 1
            ways = np.minimum(s.min_ways + (draws[:, 0] * span).astype(np.int64), self.max_ways)
        else:  # an ontology: one pool per episode, uniformly; its classes only
            u = np_uniform(seed, split, index, GROUP_STREAM, 1)[:, 0]
            pool = np.minimum((u * len(self.pools)).astype(np.int64), len(self.pools) - 1)
            top = np.minimum(self._pool_sizes[pool], s.max_ways)
            if self.pool_ways == "span":  # a node's leaves, max_ways of them at random
                ways = top
            else:  # a group: ways uniform up to its size
                span = top - s.min_ways + 1
                ways = np.minimum(s.min_ways + (draws[:, 0] * span).astype(np.int64), top)
            keys = np.where(self._members[pool], keys, np.iinfo(np.int64).max)
        # Only as many columns as this meta-batch's largest episode: the key of way j is the
        # same whatever the number of columns (the hash counts j * columns' size + slot), so an
        # episode does not depend on the batch it is drawn in.
        hi = int(ways.max()) if len(index) else 1
        classes = np.argsort(keys, axis=1, kind="stable")[:, :hi]
        valid = np.arange(hi)[None, :] < ways[:, None]
        counts = np.where(valid, self._counts_np[classes], 0)
        smallest = np.where(valid, counts, np.iinfo(np.int64).max).min(1)
        queries = np.minimum(smallest // 2, s.max_query_per_class)
        remaining = np.where(valid, counts - queries[:, None], 0)
        contribution = np.minimum(remaining, s.max_support_per_class).astype(np.float64)
        size = np.where(valid, np.floor(draws[:, 1:2] * contribution + 1), 0).sum(1)
        size = np.minimum(size, s.max_support_set_size)
        noise = np_uniform(seed, split, index, WEIGHT_STREAM, hi)
        log_weight = s.min_log_weight + noise * (s.max_log_weight - s.min_log_weight)
        weight = np.where(valid, counts * np.exp(log_weight), 0.0)
        share = weight / weight.sum(1, keepdims=True)
        shots = np.floor(share * (size - ways)[:, None]).astype(np.int64) + 1
        shots = np.where(valid, np.minimum(shots, remaining), 0)
        return tuple(np.ascontiguousarray(x) for x in (classes, ways, shots, queries))

    def batch(self, indices: Any) -> RaggedEpisodes:
        """The episodes at ``indices`` as one ragged meta-batch (see :class:`RaggedEpisodes`).

        Which rows to take is worked out on the host, in numpy (at most ``ways x class size``
        keys per episode); the one gather runs where the images are."""
        episodes = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if episodes.numel() and int(episodes.min()) < 0:
            raise IndexError("Episode indices must be >= 0.")
        classes, ways, shots, queries = self._shape(episodes.numpy())
        tasks, hi = classes.shape
        valid = shots > 0
        per_way = shots + np.where(valid, queries[:, None], 0)
        picked = max(1, int(per_way.max()))
        # Per way, the images with the smallest random keys (padded slots sort last).
        width = self.base.max_count
        keys = np_hash_keys(self.seed, self.split, episodes.numpy(), 1, hi * width)
        keys = keys.reshape(tasks, hi, width)
        if width != self.base.min_count:
            beyond = np.arange(width) >= self._counts_np[classes][..., None]
            keys = np.where(beyond, np.iinfo(np.int64).max, keys)
        picks = np.argsort(keys, axis=2, kind="stable")[:, :, :picked]
        rows = self._offsets_np[classes][..., None] + picks  # [T, W, picked]
        slot = np.arange(picked)
        in_support = slot < shots[..., None]
        in_query = ~in_support & (slot < per_way[..., None])
        way_ids = np.broadcast_to(np.arange(hi), (tasks, hi))[valid]
        support_rows = rows[in_support]
        # One gather for the whole meta-batch, support rows then query rows: support and query
        # are views of one fresh buffer.
        both = self._gather(torch.from_numpy(np.concatenate([support_rows, rows[in_query]])))
        device = both.device
        labels = (np.repeat(way_ids, shots[valid]),
                  np.repeat(way_ids, np.broadcast_to(queries[:, None], (tasks, hi))[valid]))
        return RaggedEpisodes(
            support=both[: len(support_rows)],
            support_labels=torch.from_numpy(labels[0]).to(device),
            query=both[len(support_rows):],
            query_labels=torch.from_numpy(labels[1]).to(device),
            classes=self._class_ids[torch.from_numpy(classes[valid])].to(device),
            ways=torch.from_numpy(ways), support_sizes=torch.from_numpy(shots.sum(1)),
            query_sizes=torch.from_numpy(queries * ways), index=episodes)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        images = self.base.images
        if images.device.type != "cpu":
            return images.index_select(0, rows.to(images.device))
        out = empty_huge((rows.numel(), *images.shape[1:]), images.dtype)
        return torch.index_select(images, 0, rows, out=out)

    def __repr__(self) -> str:
        return (f"VariableEpisodeSampler(split={self.split!r}, seed={self.seed}, "
                f"n_classes={self.base.n_classes}, shape={self.shape})")


def class_pools(base: EpisodeSampler, min_ways: int, key: str
                ) -> tuple[list[np.ndarray] | None, str]:
    """The pools an episode's classes are drawn from, by the split's ontology
    (``base.hierarchy``), and how its ways are drawn from a pool, as Meta-Dataset does
    (``sampling.py``: ``use_dag_hierarchy``, ``use_bilevel_hierarchy``):

    - a :class:`~sharebone.data.hierarchy.ClassHierarchy` (ILSVRC): a node among those
      spanning ``min_ways`` to ``MAX_SPANNING_LEAVES`` classes; the episode takes its leaves
      (``max_ways`` of them at random when there are more): ``"span"``;
    - groups (``hierarchy: groups`` or ``group_episodes``; Omniglot's alphabets): a group
      among those with at least ``min_ways`` classes, then ways uniform in ``[min_ways,
      min(max_ways, its classes)]``: ``"uniform"``.

    ``(None, "")`` without an ontology (classes uniformly from the whole split). A class
    that no pool holds could never be drawn: refused, naming ``<key>.min_ways``."""
    hierarchy = base.hierarchy
    if isinstance(hierarchy, ClassHierarchy):
        if base.class_names is None:
            raise SettingError(f"{key}: a class hierarchy needs the names of split "
                               f"'{base.split}''s classes, and it has none.")
        names = [base.class_names[int(c)] for c in base.class_ids.cpu()]
        return hierarchy.pools(names, min_ways, key=key), "span"
    if hierarchy is not None and hierarchy != "groups":
        raise SettingError(f"hierarchy must be a class hierarchy or 'groups', got "
                           f"{hierarchy!r}.")
    if hierarchy is None and not base.group_episodes:
        return None, ""
    group = base.class_group.cpu().numpy()
    pools = [np.flatnonzero(group == g) for g in np.unique(group)]
    small = [p for p in pools if len(p) < min_ways]
    if small:
        names = base.group_names
        shown = ", ".join(f"{names[int(group[p[0]])] if names else int(group[p[0]])} "
                          f"({len(p)})" for p in small[:5])
        raise SettingError(
            f"{key}.min_ways={min_ways}, but {len(small)} group(s) of split '{base.split}' "
            f"have fewer classes: {shown}; their classes could never be drawn. Fix: "
            f"{key}.min_ways <= {min(len(p) for p in small)}, leave those groups out of the "
            "split, or sample without them (the family's hierarchy: null).")
    return pools, "uniform"


def episode_source(family: Any, split: str, seed: int, setting: Mapping[str, Any],
                   meta_dataset: Mapping[str, Any] | None = None, key: str = "sampler") -> Any:
    """The episode source of one split setting: ``family.sampler(...)`` for ``shape: fixed``
    (``n_way``/``k_shot``/``q_query``), a :class:`VariableEpisodeSampler` for
    ``shape: meta_dataset`` (its rules: ``meta_dataset``, overridden by the setting's own
    ``meta_dataset`` block). All refusals come before any image is decoded where the family
    decodes lazily, and name ``<key>.<field>``."""
    setting = dict(setting)
    shape = setting.pop("shape", "fixed")
    own = setting.pop("meta_dataset", None)
    if shape not in SHAPES:
        raise SettingError(f"{key}.shape must be one of {', '.join(SHAPES)}, got {shape!r}. "
                           f"Fix: {key}.shape=fixed (N-way K-shot) or meta_dataset.")
    if shape == "fixed":
        return family.sampler(split, seed=seed, **setting)
    where = f"{key}.meta_dataset" if own else "sampler.meta_dataset"
    rules = MetaDatasetShape.of({**dict(meta_dataset or {}), **dict(own or {})}, key=where)
    if hasattr(family, "variable_sampler"):  # many sources: each source's own, then mixed
        return family.variable_sampler(
            split, seed, lambda base: VariableEpisodeSampler(base, rules, key=where))
    base = family.sampler(split, n_way=1, k_shot=1, q_query=1, seed=seed)
    if not isinstance(base, EpisodeSampler):
        raise SettingError(f"{key}.shape=meta_dataset needs a family of image classes; "
                           f"{type(family).__name__} draws {type(base).__name__} episodes. "
                           f"Fix: {key}.shape=fixed for this task.")
    return VariableEpisodeSampler(base, rules, key=where)
