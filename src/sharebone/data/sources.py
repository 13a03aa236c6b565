"""Many sources in one run: each episode drawn from one of several task families.

``family: {name: sources, sources: [...], channels, image_size}`` (``tasks/multi_source.yaml``)
lists the sources, each with its own family block and the channels/size of its images as its
config states them. Every source's split is converted once, when its sampler is built, to the
backbone's input (:mod:`sharebone.data.convert`: grey <-> RGB, resize), so episodes of every
source have one shape. Episode ``i`` picks its source by the counter-based hash (uniformly, or
by ``weights``) and is then that source's episode ``i``: still a pure function of
``(seed, split, i)``. A meta-batch holds its tasks grouped by source, each task's source in
``sources``; validation logs every source's score as well (``val/<source>/acc``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sharebone.data.convert import conversion_between, convert_uint8
from sharebone.data.episodes import Episode, EpisodeSampler, RaggedEpisodes
from sharebone.data.families import build_family, register_family
from sharebone.data.variable import np_uniform
from sharebone.errors import SettingError

__all__ = ["MultiSourceSampler", "MultiSourceTasks"]

#: ``hash_keys`` stream of an episode's source (0-5 are the samplers').
SOURCE_STREAM = 6
KEY = "task.family"


@register_family("sources")
class MultiSourceTasks:
    """Several task families as one: episodes of each split drawn from every source.

    Args:
        sources: ``[{"name", "family": {...}, "channels", "image_size"}]``: a source's name
            (figures, per-source validation), its family block (as in its ``tasks/`` file)
            and the channels and size of its images.
        channels, image_size: the backbone's input; every source is converted to it.
        weights: one per source (per-episode source probability, normalised); None: uniform.
    """

    def __init__(self, sources: Sequence[Mapping[str, Any]], channels: int = 1,
                 image_size: int = 28, weights: Sequence[float] | None = None) -> None:
        if not sources:
            raise SettingError(f"{KEY}.sources is empty. Fix: list at least one source.")
        self.names, self.specs, self.conversions = [], [], []
        for i, source in enumerate(sources):
            key = f"{KEY}.sources[{i}]"
            missing = [k for k in ("name", "family", "channels", "image_size") if k not in source]
            if missing:
                raise SettingError(f"{key}.{missing[0]} is missing. Fix: give every source a "
                                   "name, family, channels and image_size.")
            self.conversions.append(conversion_between(
                source["channels"], source["image_size"], channels, image_size,
                f"{key}.channels"))
            self.names.append(str(source["name"]))
            self.specs.append(dict(source["family"]))
        if len(set(self.names)) != len(self.names):
            raise SettingError(f"{KEY}.sources: two sources are named alike ({self.names}). "
                               "Fix: give each its own name.")
        self.weights = check_weights(weights, len(self.names))
        self.input_shape = (int(channels), int(image_size), int(image_size))
        self._families: list[Any] | None = None

    @property
    def families(self) -> list[Any]:
        if self._families is None:
            self._families = [build_family(spec) for spec in self.specs]
        return self._families

    def _source_samplers(self, split: str, make: Any) -> list[Any]:
        samplers = []
        for i, (family, conversion) in enumerate(zip(self.families, self.conversions,
                                                     strict=True)):
            try:
                sampler = make(family)
            except SettingError as err:
                raise SettingError(f"{KEY}.sources[{i}] ({self.names[i]}): {err}") from err
            samplers.append(converted_sampler(sampler, conversion, f"{KEY}.sources[{i}]")
                            if conversion else sampler)
        return samplers

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> MultiSourceSampler:
        samplers = self._source_samplers(
            split, lambda f: f.sampler(split, n_way=n_way, k_shot=k_shot, q_query=q_query,
                                       seed=seed))
        return MultiSourceSampler(samplers, self.names, self.weights, seed, split)

    def variable_sampler(self, split: str, seed: int, wrap: Any) -> MultiSourceSampler:
        """Meta-Dataset-shaped episodes of every source (``wrap``: base -> variable)."""
        samplers = self._source_samplers(
            split, lambda f: f.sampler(split, n_way=1, k_shot=1, q_query=1, seed=seed))
        return MultiSourceSampler([wrap(s) for s in samplers], self.names, self.weights,
                                  seed, split)


def check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Per-source probabilities from ``weights`` (one per source, >= 0, not all 0)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    values = list(weights)
    if len(values) != n:
        raise SettingError(f"{KEY}.weights has {len(values)} entries for {n} sources. Fix: one "
                           "weight per source, in the order of task.family.sources, or null.")
    if any(isinstance(w, bool) or not isinstance(w, int | float) or w < 0 for w in values) \
            or sum(values) <= 0:
        raise SettingError(f"{KEY}.weights must be numbers >= 0, not all 0; got {values}.")
    array = np.asarray(values, dtype=np.float64)
    return array / array.sum()


def converted_sampler(sampler: Any, conversion: Any, key: str) -> EpisodeSampler:
    """``sampler``'s split with its images converted once (uint8 to uint8)."""
    if not isinstance(sampler, EpisodeSampler) or sampler.transform is not None:
        raise SettingError(f"{key}: converting a source's images needs a plain image family "
                           "(no augment/normalize of its own). Fix: give the source the "
                           "backbone's channels and image_size, or drop its augment/normalize.")
    labels = sampler.class_ids.repeat_interleave(sampler.counts)
    groups = None
    if sampler.class_group is not None:  # position -> group, back to label -> group (names)
        ids = torch.zeros(int(sampler.class_ids.max()) + 1, dtype=torch.int64)
        ids[sampler.class_ids] = sampler.class_group.cpu()
        names = sampler.group_names
        groups = ids if names is None else [names[i] for i in ids.tolist()]
    return EpisodeSampler(convert_uint8(sampler.images, conversion), labels, sampler.n_way,
                          sampler.k_shot, sampler.q_query, seed=sampler.seed,
                          split=sampler.split, class_names=sampler.class_names,
                          groups=groups, group_episodes=sampler.group_episodes,
                          hierarchy=sampler.hierarchy)


class MultiSourceSampler:
    """Episodes of several samplers: episode ``i`` is source ``s(i)``'s episode ``i``."""

    def __init__(self, samplers: Sequence[Any], names: Sequence[str], weights: np.ndarray,
                 seed: int, split: str) -> None:
        self.samplers, self.names = list(samplers), list(names)
        self.cumulative = np.cumsum(weights)
        self.seed, self.split = int(seed), split
        self.transform = None

    @property
    def device(self) -> torch.device:
        return self.samplers[0].device

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.samplers)

    def to(self, device: torch.device | str) -> MultiSourceSampler:
        moved = object.__new__(MultiSourceSampler)
        moved.__dict__.update(self.__dict__)
        moved.samplers = [s.to(device) for s in self.samplers]
        return moved

    def prepare(self, batch: Any) -> Any:
        return batch.to_float()

    def class_name(self, label: int) -> str:
        return f"class {label}"  # a label alone does not say its source: see named()

    def named(self, name: str) -> Any:
        """The sampler of source ``name`` (its class names, say)."""
        return self.samplers[self.names.index(name)]

    def source_of(self, episodes: torch.Tensor) -> np.ndarray:
        """The source (position in ``names``) of each episode."""
        u = np_uniform(self.seed, self.split, episodes.numpy(), SOURCE_STREAM, 1)[:, 0]
        return np.minimum(np.searchsorted(self.cumulative, u, side="right"),
                          len(self.samplers) - 1)

    def __getitem__(self, index: int) -> Episode:
        return self.batch([index]).task(0)

    def batch(self, indices: Any) -> Episode | RaggedEpisodes:
        """Episodes at ``indices``, grouped by source (``sources`` says whose each is)."""
        episodes = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        choice = self.source_of(episodes)
        parts, names = [], []
        for s, sampler in enumerate(self.samplers):
            mine = episodes[torch.from_numpy(choice == s)]
            if mine.numel():
                parts.append(sampler.batch(mine))
                names += [self.names[s]] * mine.numel()
        return join(parts, tuple(names))


def join(parts: list[Any], sources: tuple[str, ...]) -> Episode | RaggedEpisodes:
    """Meta-batches of one kind concatenated along their tasks, ``sources`` attached."""
    first = parts[0]
    if isinstance(first, RaggedEpisodes):
        fields = ("support", "support_labels", "query", "query_labels", "classes", "ways",
                  "support_sizes", "query_sizes", "index")
        values = {f: torch.cat([getattr(p, f) for p in parts]) if len(parts) > 1
                  else getattr(first, f) for f in fields}
        return RaggedEpisodes(**values, sources=sources)
    values = {f: torch.cat([getattr(p, f) for p in parts]) if len(parts) > 1
              else getattr(first, f)
              for f in ("support", "support_labels", "query", "query_labels", "classes",
                        "index")}
    return Episode(**values, sources=sources)

