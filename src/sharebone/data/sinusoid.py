"""Sinusoid regression (Finn et al. 2017, section 5.1): the meta-learning benchmark with no data.

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``phi ~ U[0, pi]``;
its K support and Q query points have ``x ~ U[-5, 5]``. As for image tasks, episode ``i`` of a
split under a seed is a pure function of ``(seed, split, i)`` (see
:func:`sharebone.data.episodes.hash_keys`), so the "100 fixed test tasks" of Li et al. (2017)
are simply test episodes ``0..99``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sharebone.data.episodes import Episode, hash_keys
from sharebone.data.families import register_family
from sharebone.errors import SettingError, check_count

_U53 = (1 << 53) - 1


def uniforms(keys: torch.Tensor) -> torch.Tensor:
    """int64 hash keys -> float64 uniforms in ``[0, 1)``: the top 53 bits of each key."""
    return ((keys >> 11) & _U53).to(torch.float64) * 2.0**-53


class SinusoidSampler:
    """K-shot regression episodes of one split; see :class:`SinusoidTasks`.

    Episode fields (``T`` tasks): ``support [T, K, 1]`` inputs x, ``support_labels [T, K, 1]``
    targets y, ``query [T, Q, 1]``, ``query_labels [T, Q, 1]``, ``classes [T, 1]`` zeros (one
    "way": ``Episode.n_way == 1``). Amplitudes and phases: :meth:`task_parameters`.

    Example:
        >>> sampler = SinusoidTasks().sampler("train", n_way=1, k_shot=5, q_query=10, seed=0)
        >>> episode = sampler.batch(range(3))
        >>> tuple(episode.support.shape), tuple(episode.query_labels.shape), episode.n_way
        ((3, 5, 1), (3, 10, 1), 1)
        >>> torch.equal(sampler.batch([1]).query, episode.query[1:2])   # addressable
        True
    """

    def __init__(self, family: SinusoidTasks, split: str, k_shot: int, q_query: int,
                 seed: int) -> None:
        self.family, self.split = family, split
        self.k_shot, self.q_query, self.seed = int(k_shot), int(q_query), int(seed)

    def task_parameters(self, episodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude ``[T]`` and phase ``[T]`` of the given episodes."""
        u = uniforms(hash_keys(self.seed, self.split, episodes, 0, (2,)))
        (a_lo, a_hi), (p_lo, p_hi) = self.family.amplitude, self.family.phase
        return a_lo + (a_hi - a_lo) * u[:, 0], p_lo + (p_hi - p_lo) * u[:, 1]

    def frequency(self, episodes: torch.Tensor) -> torch.Tensor:
        """Frequency ``[T]`` of the given episodes: 1 in Finn et al.'s tasks; drawn from its
        own hash stream otherwise, so that fixing it leaves every other draw unchanged."""
        lo, hi = self.family.frequency
        if lo == hi:
            return torch.full((episodes.numel(),), lo, dtype=torch.float64)
        return lo + (hi - lo) * uniforms(hash_keys(self.seed, self.split, episodes, 2, (1,)))[:, 0]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> Episode:
        episodes = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if episodes.numel() and int(episodes.min()) < 0:
            raise IndexError("Episode indices must be >= 0.")
        amplitude, phase = self.task_parameters(episodes)
        x_lo, x_hi = self.family.x_range
        n = self.k_shot + self.q_query
        x = x_lo + (x_hi - x_lo) * uniforms(hash_keys(self.seed, self.split, episodes, 1, (n,)))
        frequency = self.frequency(episodes).unsqueeze(1)
        y = amplitude.unsqueeze(1) * torch.sin(frequency * x - phase.unsqueeze(1))
        x, y = x.float().unsqueeze(-1), y.float().unsqueeze(-1)
        k = self.k_shot
        return Episode(support=x[:, :k], support_labels=y[:, :k], query=x[:, k:],
                       query_labels=y[:, k:],
                       classes=torch.zeros(episodes.numel(), 1, dtype=torch.int64))

    def __getitem__(self, index: int) -> Episode:
        return self.batch([index]).task(0)

    def __repr__(self) -> str:
        return (f"SinusoidSampler(split={self.split!r}, seed={self.seed}, k_shot={self.k_shot}, "
                f"q_query={self.q_query})")


@register_family("sinusoid")
class SinusoidTasks:
    """The sinusoid task family (Finn et al. 2017): every split is an infinite, seeded stream
    of regression tasks; splits differ only by their name in the hash, not by their ranges.

    Args:
        amplitude, phase, x_range: ``[low, high]`` of the uniform distributions (the paper's
            defaults).
        frequency: ``[low, high]`` of ``w`` in ``y = A sin(w x - phase)``: ``[1, 1]`` in Finn
            et al. (2017); ``[0.8, 1.2]`` in Li et al.'s (2017) Meta-SGD Table 1
            (``tasks/sinusoid_metasgd.yaml``).
    """

    input_shape = (1,)

    def __init__(self, amplitude: Sequence[float] = (0.1, 5.0),
                 phase: Sequence[float] = (0.0, math.pi),
                 x_range: Sequence[float] = (-5.0, 5.0),
                 frequency: Sequence[float] = (1.0, 1.0)) -> None:
        ranges = (("amplitude", amplitude), ("phase", phase), ("x_range", x_range),
                  ("frequency", frequency))
        for name, (lo, hi) in ranges:
            if not lo <= hi:
                raise SettingError(f"{name} must be [low, high] with low <= high, got {[lo, hi]}.")
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.frequency = (float(frequency[0]), float(frequency[1]))

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> SinusoidSampler:
        if n_way != 1:
            raise SettingError(f"Sinusoid tasks are regression tasks with one output (n_way=1), "
                               f"got n_way={n_way}. Set n_way: 1 (tasks/sinusoid.yaml does).")
        return SinusoidSampler(self, split, check_count("k_shot", k_shot),
                               check_count("q_query", q_query), seed)
