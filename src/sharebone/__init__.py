"""sharebone: meta-learning and transfer around a shared backbone with task-specific heads.

The Python API, for a training loop of one's own (README, "Python API")::

    from sharebone import EpisodeSampler, create_regime, adapt, accuracy

- :class:`EpisodeSampler` / :class:`Episode`: N-way K-shot episodes from ``[N, C, H, W]``
  images and ``[N]`` labels; episode ``i`` is a pure function of ``(seed, split, i)``.
- :func:`create_regime` (``"maml"``, ``"protonet"``, ...): a regime on a backbone given as a
  registry spec or as an ``nn.Module``; its ``episode_loss`` / ``predict_episode`` take
  episodes straight from a sampler. :class:`FewShotRegime` is their base class.
- :func:`load_regime`: a regime back from a checkpoint; :func:`create_backbone`: a registered
  backbone by name.
- :func:`adapt`: the MAML family's inner loop, gradient steps on a parameter dict.
- :func:`accuracy`: per-task accuracy of query logits.

Names are imported on first use, so ``import sharebone`` loads nothing heavy and Lightning
is imported only when a regime is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "Episode": "sharebone.data.episodes",
    "EpisodeSampler": "sharebone.data.episodes",
    "FewShotRegime": "sharebone.regimes.base",
    "accuracy": "sharebone.task_kind",
    "adapt": "sharebone.adaptation",
    "create_backbone": "sharebone.models.backbones",
    "create_regime": "sharebone.regimes.base",
    "load_regime": "sharebone.regimes.loading",
}

__all__ = ["Episode", "EpisodeSampler", "FewShotRegime", "accuracy", "adapt", "create_backbone",
           "create_regime", "load_regime"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on use
    from sharebone.adaptation import adapt
    from sharebone.data.episodes import Episode, EpisodeSampler
    from sharebone.models.backbones import create_backbone
    from sharebone.regimes.base import FewShotRegime, create_regime
    from sharebone.regimes.loading import load_regime
    from sharebone.task_kind import accuracy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sharebone' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found by plain lookup from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
