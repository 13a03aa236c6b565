"""Variable-way, variable-shot episodes by Meta-Dataset's rules (Triantafillou et al., ICLR
2020, arXiv:1903.03096, section 3.2 and appendix; ``meta_dataset/data/sampling.py``).

Per episode, from the split's classes:

1. ways ``N ~ U{min_ways .. min(max_ways, classes)}``, then ``N`` classes uniformly;
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

import torch

from sharebone.data.episodes import (
    Episode,
    EpisodeSampler,
    RaggedEpisodes,
    hash_keys,
    uniform,
)
from sharebone.errors import SettingError
from sharebone.memory import empty_huge

__all__ = ["SHAPES", "MetaDatasetShape", "VariableEpisodeSampler", "episode_source"]

#: ``sampler.<split>.shape`` (and a test setting's ``shape``).
SHAPES = ("fixed", "meta_dataset")
#: ``hash_keys`` streams of the shape's draws (0-3 are the fixed sampler's).
WAYS_STREAM, WEIGHT_STREAM = 4, 5


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
    ``topk`` over image keys and one gather each for support and query.

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
        if base.group_episodes:
            raise SettingError(f"{key}: episodes within one group (group_episodes) are not "
                               "built for shape=meta_dataset. Fix: turn group_episodes off.")
        if base.n_classes < shape.min_ways:
            raise SettingError(
                f"{key}.min_ways={shape.min_ways}, but split '{base.split}' has only "
                f"{base.n_classes} classes. Fix: {key}.min_ways <= {base.n_classes}, or a "
                "split with more classes.")
        self.base, self.shape = base, shape
        self.seed, self.split = base.seed, base.split
        self.transform = base.transform
        self.max_ways = min(shape.max_ways, base.n_classes)
        self._counts = base.counts.cpu()
        self._class_ids = base.class_ids.cpu()

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
        s, seed, split = self.shape, self.seed, self.split
        tasks, hi = episodes.numel(), self.max_ways
        draws = uniform(seed, split, episodes, WAYS_STREAM, (2,))
        ways = (s.min_ways + (draws[:, 0] * (hi - s.min_ways + 1)).long()).clamp_(max=hi)
        keys = hash_keys(seed, split, episodes, 0, (self._counts.numel(),))
        classes = torch.topk(keys, hi, dim=1, largest=False, sorted=True).indices
        valid = torch.arange(hi).expand(tasks, hi) < ways.unsqueeze(1)
        counts = torch.where(valid, self._counts[classes], 0)
        smallest = torch.where(valid, counts, torch.iinfo(torch.int64).max).min(1).values
        queries = torch.clamp(smallest // 2, max=s.max_query_per_class)
        remaining = torch.where(valid, counts - queries.unsqueeze(1), 0)
        contribution = remaining.clamp(max=s.max_support_per_class).double()
        beta = draws[:, 1].unsqueeze(1)
        size = torch.where(valid, torch.floor(beta * contribution + 1), 0).sum(1)
        size = size.clamp(max=s.max_support_set_size)
        noise = uniform(seed, split, episodes, WEIGHT_STREAM, (hi,))
        log_weight = s.min_log_weight + noise * (s.max_log_weight - s.min_log_weight)
        weight = torch.where(valid, counts.double() * torch.exp(log_weight), 0.0)
        share = weight / weight.sum(1, keepdim=True)
        shots = torch.floor(share * (size - ways.double()).unsqueeze(1)).long() + 1
        shots = torch.where(valid, torch.minimum(shots, remaining), 0)
        return classes, ways, shots, queries

    def batch(self, indices: Any) -> RaggedEpisodes:
        """The episodes at ``indices`` as one ragged meta-batch (see :class:`RaggedEpisodes`)."""
        episodes = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if episodes.numel() and int(episodes.min()) < 0:
            raise IndexError("Episode indices must be >= 0.")
        classes, ways, shots, queries = self.draw_shape(episodes)
        tasks, hi = classes.shape
        per_way = shots + torch.where(shots > 0, queries.unsqueeze(1), 0)
        picked = max(1, int(per_way.max()))
        base, device = self.base, self.base.device
        # Per way, the images with the smallest random keys (padded slots sort last).
        keys = hash_keys(self.seed, self.split, episodes.to(device), 1, (hi, base.max_count))
        counts = base.counts[classes.to(device)]
        if base.max_count != base.min_count:
            slot = torch.arange(base.max_count, device=device)
            keys = keys.masked_fill(slot >= counts.unsqueeze(-1), torch.iinfo(torch.int64).max)
        picks = torch.topk(keys, picked, dim=2, largest=False, sorted=True).indices
        rows = base.offsets[classes.to(device)].unsqueeze(-1) + picks  # [T, W, picked]
        slot = torch.arange(picked)
        in_support = slot < shots.unsqueeze(-1)
        in_query = ~in_support & (slot < per_way.unsqueeze(-1))
        valid = shots > 0
        way_ids = torch.arange(hi).expand(tasks, hi)[valid]
        return RaggedEpisodes(
            support=self._gather(rows[in_support.to(device)]),
            support_labels=way_ids.repeat_interleave(shots[valid]).to(device),
            query=self._gather(rows[in_query.to(device)]),
            query_labels=way_ids.repeat_interleave(
                queries.unsqueeze(1).expand(tasks, hi)[valid]).to(device),
            classes=self._class_ids[classes[valid]].to(device),
            ways=ways, support_sizes=shots.sum(1), query_sizes=queries * ways,
            index=episodes)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        images = self.base.images
        if images.device.type != "cpu":
            return images.index_select(0, rows)
        out = empty_huge((rows.numel(), *images.shape[1:]), images.dtype)
        return torch.index_select(images, 0, rows, out=out)

    def __repr__(self) -> str:
        return (f"VariableEpisodeSampler(split={self.split!r}, seed={self.seed}, "
                f"n_classes={self.base.n_classes}, shape={self.shape})")


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
    base = family.sampler(split, n_way=1, k_shot=1, q_query=1, seed=seed)
    if not isinstance(base, EpisodeSampler):
        raise SettingError(f"{key}.shape=meta_dataset needs a family of image classes; "
                           f"{type(family).__name__} draws {type(base).__name__} episodes. "
                           f"Fix: {key}.shape=fixed for this task.")
    return VariableEpisodeSampler(base, rules, key=where)
