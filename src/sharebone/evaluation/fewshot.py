"""Score any regime on fixed, seeded test episodes: the same tasks for every method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch

from sharebone.data.tasks import TaskFamily
from sharebone.evaluation.stats import FewShotResult, summarize
from sharebone.regimes.base import FewShotRegime


def episode_scores(model: FewShotRegime, family: TaskFamily, split: str, n_way: int,
                       k_shot: int, q_query: int, episodes: int, seed: int,
                       batch_size: int = 32) -> torch.Tensor:
    """Per-episode query score ``[episodes]`` (the metric of the regime's task kind: accuracy
    for classification, MSE for regression) on episodes ``0..episodes-1`` of ``split``."""
    source = family.sampler(split, n_way=n_way, k_shot=k_shot, q_query=q_query, seed=seed)
    was_training = model.training
    model.eval()
    # MAML-like regimes adapt with gradients even at test time.
    grad = torch.no_grad() if model.predicts_without_grad else contextlib.nullcontext()
    scores = []
    try:
        with grad:
            for start in range(0, episodes, batch_size):
                index = torch.arange(start, min(start + batch_size, episodes))
                episode = source.batch(index).to(model.device).to_float()
                predictions = model.predict_episode(episode).detach()
                scores.append(model.task_kind.metric(predictions, episode.query_labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


def evaluate(model: FewShotRegime, family: TaskFamily, settings: Iterable[Mapping[str, int]],
             episodes: int = 600, q_query: int = 15, seed: int = 0, split: str = "test",
             batch_size: int = 32) -> list[FewShotResult]:
    """Mean score (accuracy, or MSE) ± 95% CI for each ``{"n_way", "k_shot"}`` setting.

    Episode ``i`` of a setting is fixed by ``(seed, split, i)``: two checkpoints evaluated
    with the same arguments see exactly the same support and query images.
    """
    results = []
    for setting in settings:
        n_way, k_shot = int(setting["n_way"]), int(setting["k_shot"])
        q = int(setting.get("q_query", q_query))
        scores = episode_scores(model, family, split, n_way, k_shot, q, episodes, seed,
                                batch_size)
        results.append(summarize(scores, n_way, k_shot, q,
                                 metric=model.task_kind.metric_name))
    return results
