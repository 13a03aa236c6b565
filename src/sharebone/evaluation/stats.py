"""Few-shot statistics as the field reports them: mean accuracy and 95% confidence interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from sharebone.errors import SettingError


@dataclass(frozen=True)
class FewShotResult:
    """Accuracy over ``episodes`` test episodes of one (n_way, k_shot) setting.

    ``ci95`` is the half-width ``1.96 * std / sqrt(episodes)`` (population std over episodes),
    so results read ``mean ± ci95``.
    """

    n_way: int
    k_shot: int
    q_query: int
    episodes: int
    mean: float
    std: float
    ci95: float
    metric: str = "acc"
    #: ``fixed`` (N-way K-shot), or ``meta_dataset`` (variable ways and shots; ``n_way``,
    #: ``k_shot`` and ``q_query`` are then 0: they differ per episode).
    shape: str = "fixed"
    #: The source of the episodes in a run of many sources (``average``: their mean).
    source: str | None = None

    @property
    def name(self) -> str:
        setting = self.shape if self.shape != "fixed" else f"{self.n_way}w{self.k_shot}s"
        return setting if self.source is None else f"{self.source}/{setting}"

    def as_dict(self) -> dict[str, float | int | str]:
        return {"setting": self.name, **asdict(self)}

    def __str__(self) -> str:
        if self.metric == "acc":
            return f"{self.name}: {100 * self.mean:.2f} ± {100 * self.ci95:.2f}%"
        return f"{self.name}: {self.metric} {self.mean:.4f} ± {self.ci95:.4f}"


def summarize(scores: torch.Tensor, n_way: int, k_shot: int, q_query: int,
              metric: str = "acc", shape: str = "fixed",
              source: str | None = None) -> FewShotResult:
    """Mean and 95% CI of per-episode scores (accuracies, or MSE for regression)."""
    acc = scores.double().flatten()
    n = acc.numel()
    if n == 0:
        raise SettingError("No episodes to summarize.")
    std = acc.std(unbiased=False).item() if n > 1 else 0.0
    return FewShotResult(n_way=n_way, k_shot=k_shot, q_query=q_query, episodes=n,
                         mean=acc.mean().item(), std=std, ci95=1.96 * std / math.sqrt(n),
                         metric=metric, shape=shape, source=source)


def format_table(results: list[FewShotResult]) -> str:
    """A Markdown table, one row per setting (accuracy in %, other metrics as they are)."""
    percent = all(r.metric == "acc" for r in results)
    unit = "accuracy (%)" if percent else "score"
    lines = [f"| setting | episodes | metric | {unit} | 95% CI |", "|---|---|---|---|---|"]
    for r in results:
        scale, digits = (100, 2) if percent else (1, 4)
        lines.append(f"| {r.name} | {r.episodes} | {r.metric} | {scale * r.mean:.{digits}f} | "
                     f"± {scale * r.ci95:.{digits}f} |")
    return "\n".join(lines)
