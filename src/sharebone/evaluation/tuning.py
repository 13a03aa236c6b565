"""Test-time settings left to ``auto``, chosen on validation episodes after training.

The inner steps of MAML (``regime.test_inner_steps``) and the test-time fine-tuning of the
other regimes (``sharing.test_steps``, ``sharing.test_lr``) are usually copied from a paper's
Omniglot runs. On other data they overshoot or undershoot (MAML on a folder of drawings: 76%
at 1 step, 47% at the configured 3), and the run then reports the worse number. ``auto``
scores every candidate on the same validation episodes (never the test ones), keeps the best
(the first of equals, candidates running from the least adaptation up) and stores it in the
model's hyperparameters, so the test and every later ``sharebone-eval`` use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sharebone.evaluation.fewshot import TestEpisodes, episode_scores


@dataclass(frozen=True)
class Choice:
    """The values chosen (config key -> value) and every candidate's validation score
    (the mean over the validation settings), in the order they were tried."""

    chosen: dict[str, Any]
    tried: list[tuple[dict[str, Any], float]]
    metric: str
    episodes: int
    #: Keys whose choice is the last (most adaptation) of several candidates: validation may
    #: prefer more than the grid offers.
    at_edge: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": dict(self.chosen), "metric": self.metric, "episodes": self.episodes,
                "at_edge": list(self.at_edge),
                "tried": [{**values, f"val_{self.metric}": score}
                          for values, score in self.tried]}

    def edge_note(self) -> str:
        """A line for each choice at the grid's end ('' when none is)."""
        return "\n".join(f"{k}={self.chosen[k]} is the largest candidate tried: more may score "
                         f"higher on validation; to try it, give {k}=<value> and score the "
                         f"checkpoint on the validation split (sharebone-eval split=val)."
                         for k in self.at_edge)

    def table(self) -> str:
        keys = list(self.chosen)
        lines = ["  ".join(f"{k:>24}" for k in keys) + f"  {'val ' + self.metric:>10}"]
        for values, score in self.tried:
            mark = "  <- chosen" if values == self.chosen else ""
            lines.append("  ".join(f"{values[k]!s:>24}" for k in keys) +
                         f"  {score:10.4f}{mark}")
        return "\n".join(lines)


def choose_on_validation(model: Any, tests: Sequence[TestEpisodes], episodes: int,
                         episodes_per_batch: int | str = "auto") -> Choice | None:
    """Score every combination of ``model.auto_settings()`` on ``tests`` (validation
    episodes), set the best on the model (:meth:`set_test_setting`) and return the choice;
    ``None`` when nothing is left to ``auto``."""
    auto = model.auto_settings()
    if not auto:
        return None
    keys = list(auto)
    higher = model.metric_higher_is_better
    tried: list[tuple[dict[str, Any], float]] = []
    for combination in itertools.product(*auto.values()):
        values = dict(zip(keys, combination, strict=True))
        for key, value in values.items():
            model.set_test_setting(key, value)
        per_setting = [float(episode_scores(model, t, episodes, episodes_per_batch).mean())
                       for t in tests]
        tried.append((values, sum(per_setting) / len(per_setting)))
    best = (max if higher else min)(tried, key=lambda item: item[1])[0]
    for key, value in best.items():
        model.set_test_setting(key, value)
    return Choice(best, tried, model.metric_name, episodes, at_edge(auto, best))


def at_edge(candidates: dict[str, Sequence[Any]], chosen: dict[str, Any]) -> tuple[str, ...]:
    """The keys whose choice is the last of several candidates (the most adaptation).

    Example:
        >>> at_edge({"a": (0, 5, 10), "b": (1e-3, 1e-2), "c": (3,)}, {"a": 10, "b": 1e-3, "c": 3})
        ('a',)
    """
    return tuple(k for k, values in candidates.items()
                 if len(values) > 1 and chosen[k] == values[-1])
