"""Score any regime on fixed, seeded test episodes: the same tasks for every method."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sharebone.data.tasks import EpisodeSource, TaskFamily, prepare_episode
from sharebone.data.variable import episode_source
from sharebone.errors import SettingError, check_count
from sharebone.evaluation.stats import FewShotResult, summarize
from sharebone.regimes.base import FewShotRegime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestEpisodes:
    """The fixed episodes of one test setting: episode ``i`` is ``source.batch([i])``."""

    n_way: int
    k_shot: int
    q_query: int
    source: EpisodeSource
    #: ``fixed``, or ``meta_dataset`` (variable ways and shots: ``n_way`` etc. are 0).
    shape: str = "fixed"
    #: The source these episodes come from, in a run of many sources (else None).
    source_name: str | None = None

    @property
    def name(self) -> str:
        setting = self.shape if self.shape != "fixed" else f"{self.n_way}w{self.k_shot}s"
        return setting if self.source_name is None else f"{self.source_name}/{setting}"

    def summarize(self, scores: torch.Tensor, metric: str) -> FewShotResult:
        return summarize(scores, self.n_way, self.k_shot, self.q_query, metric=metric,
                         shape=self.shape, source=self.source_name)


def per_source(tests: list[TestEpisodes]) -> list[TestEpisodes]:
    """A many-source family's test settings, one per source (the episodes of each source's
    own sampler), so the table has a row per source; :func:`evaluate` adds their average."""
    out = []
    for test in tests:
        named = getattr(test.source, "named", None)
        if named is None:
            out.append(test)
            continue
        out += [dataclasses.replace(test, source=named(name), source_name=name)
                for name in test.source.names]
    return out


def test_episodes(family: TaskFamily, settings: Iterable[Mapping[str, int]], q_query: int = 15,
                  seed: int = 0, split: str = "test", prefix: str = "",
                  meta_dataset: Mapping[str, Any] | None = None) -> list[TestEpisodes]:
    """The episode source of every ``{"n_way", "k_shot"[, "q_query"]}`` setting, built (and so
    checked against the split's classes) once, before any training or scoring. A setting
    ``{"shape": "meta_dataset"}`` is Meta-Dataset's variable-way, variable-shot episodes
    (rules: ``meta_dataset``, else the paper's; a setting's own ``meta_dataset`` block wins).

    An error names the keys to change as the config spells them: ``settings[0].k_shot``, and
    ``q_query`` (or ``settings[0].q_query`` where the setting has its own), each under
    ``prefix`` (``"test."`` in a training config).

    Example:
        >>> from sharebone.data.tasks import SyntheticImageTasks
        >>> family = SyntheticImageTasks({"test": 10})
        >>> [t.name for t in test_episodes(family, [{"n_way": 5, "k_shot": 1}], q_query=5)]
        ['5w1s']
        >>> test_episodes(family, [{"n_way": 5, "k_shot": 1}], q_query=0, prefix="test.")
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: test.q_query: (test.settings[0], 5w1s) test.q_query ...
    """
    tests = []
    for i, setting in enumerate(settings):
        if setting.get("shape", "fixed") != "fixed":
            source = episode_source(family, split, seed, setting, meta_dataset,
                                    key=f"{prefix}settings[{i}]")
            tests.append(TestEpisodes(0, 0, 0, source, shape=str(setting["shape"])))
            continue
        n_way, k_shot = setting.get("n_way"), setting.get("k_shot")
        q = setting.get("q_query", q_query)
        try:
            source = family.sampler(split, n_way=n_way, k_shot=k_shot, q_query=q, seed=seed)
        except ValueError as err:
            keys = {name: f"{prefix}settings[{i}].{name}" for name in ("n_way", "k_shot")}
            keys["q_query"] = (f"{prefix}settings[{i}].q_query" if "q_query" in setting
                               else f"{prefix}q_query")
            message = _spell_keys(str(err), keys)
            # The key to change first: of those the message names, the one set highest.
            values = {"n_way": n_way, "k_shot": k_shot, "q_query": q}
            named = [k for k in keys if keys[k] in message and isinstance(values[k], int)]
            first = (keys[max(named, key=values.__getitem__)] if named
                     else f"{prefix}settings[{i}]")
            raise SettingError(f"{first}: ({prefix}settings[{i}], {n_way}w{k_shot}s) "
                               f"{message}") from err
        tests.append(TestEpisodes(int(n_way), int(k_shot), int(q), source))
    return per_source(tests)


def _spell_keys(message: str, keys: Mapping[str, str]) -> str:
    """``message`` with each bare name (``q_query``) spelled as its config key."""
    return re.sub(r"\b(" + "|".join(keys) + r")\b", lambda m: keys[m.group(1)], message)


#: ``test.batch_size: auto``, by device type. On a CPU one episode per forward pass scores
#: as fast as any batch (ProtoNet: faster) in the least memory (scripts/bench_test_batch.py;
#: the numbers are in configs/train.yaml); a GPU needs batches to be busy: 32 there, the
#: default before ``auto``.
AUTO_EPISODES_PER_BATCH = {"cpu": 1}
AUTO_EPISODES_PER_BATCH_ACCELERATOR = 32


def batch_size_for(value: int | str, device: torch.device | str) -> int:
    """Episodes per forward pass: ``value``, or for ``"auto"`` the one for ``device``.

    Example:
        >>> batch_size_for("auto", "cpu"), batch_size_for("auto", "cuda:0")
        (1, 32)
        >>> batch_size_for("all", "cpu")
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: batch_size must be auto or an integer >= 1, got 'all'.
    """
    if value == "auto":
        return AUTO_EPISODES_PER_BATCH.get(torch.device(device).type,
                                           AUTO_EPISODES_PER_BATCH_ACCELERATOR)
    try:
        return check_count("batch_size", value)
    except ValueError:
        raise SettingError(f"batch_size must be auto or an integer >= 1, got {value!r}.") from None


def episode_scores(model: FewShotRegime, test: TestEpisodes, episodes: int,
                   episodes_per_batch: int | str = "auto") -> torch.Tensor:
    """Per-episode query score ``[episodes]`` (the regime's metric, accuracy for
    classification) on episodes ``0..episodes-1`` of ``test``, ``episodes_per_batch`` at a
    time (``"auto"``: :func:`batch_size_for` the model's device)."""
    episodes_per_batch = batch_size_for(episodes_per_batch, model.device)
    was_training = model.training
    model.eval()
    scores = []
    progress = Progress(test.name, episodes)
    try:
        with model.prediction_context():
            for start in range(0, episodes, episodes_per_batch):
                index = torch.arange(start, min(start + episodes_per_batch, episodes))
                episode = prepare_episode(test.source, test.source.batch(index).to(model.device))
                for predictions, labels in model.task_predictions(episode):
                    scores.append(model.task_kind.metric(predictions.detach(), labels).cpu())
                progress.update(int(index[-1]) + 1)
    finally:
        model.train(was_training)
    return torch.cat(scores)


def scores_by_inner_steps(model: FewShotRegime, test: TestEpisodes, steps: Sequence[int],
                          episodes: int, episodes_per_batch: int | str = "auto",
                          ) -> list[FewShotResult]:
    """``test``'s first ``episodes`` episodes scored after each count of inner steps in
    ``steps`` (the same episodes for every count), for a regime that adapts by gradient steps
    (:meth:`~sharebone.regimes.maml.regime.MAML.scoring_with`); its hyperparameters are left
    as they were."""
    if not hasattr(model, "scoring_with"):
        raise SettingError(f"{model.regime_name} has no inner loop to score at several step "
                           "counts (the MAML family has: maml, fomaml, anil, metasgd).")
    results = []
    for count in steps:
        with model.scoring_with(count):
            per_episode = episode_scores(model, test, episodes, episodes_per_batch)
        results.append(test.summarize(per_episode, model.metric_name))
    return results


class Progress:
    """A log line every ``every`` seconds and at the end (done, rate, ETA): plain lines, so
    they show in ``train.log``, under nohup and in a SLURM ``.out`` file, not only on a TTY."""

    def __init__(self, name: str, total: int, every: float = 15.0) -> None:
        self.name, self.total, self.every = name, total, every
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if done < self.total else 0.0
        log.info("%s: %d/%d episodes, %.1f episodes/s, %s", self.name, done, self.total, rate,
                 f"ETA {eta:.0f}s" if done < self.total else f"{now - self.started:.1f}s")


def evaluate(model: FewShotRegime, tests: Sequence[TestEpisodes], episodes: int = 600,
             episodes_per_batch: int | str = "auto") -> list[FewShotResult]:
    """Mean score (accuracy, or MSE) ± 95% CI for each test setting (see :func:`test_episodes`).

    Episode ``i`` of a setting is fixed by ``(seed, split, i)``: two checkpoints evaluated
    with the same settings see exactly the same support and query images.
    """
    check_count("episodes", episodes)
    batch_size_for(episodes_per_batch, "cpu")  # checked before any scoring
    results = [test.summarize(episode_scores(model, test, episodes, episodes_per_batch),
                              model.metric_name) for test in tests]
    return with_source_averages(results)


def with_source_averages(results: list[FewShotResult]) -> list[FewShotResult]:
    """After each setting's per-source rows, their average (Meta-Dataset's summary: the mean
    of the sources' means; its 95% CI from theirs, the sources being independent)."""
    out: list[FewShotResult] = []
    group: list[FewShotResult] = []

    def close() -> None:
        if group:
            out.append(dataclasses.replace(
                group[0], source="average", episodes=sum(r.episodes for r in group),
                mean=sum(r.mean for r in group) / len(group),
                std=sum(r.std for r in group) / len(group),
                ci95=sum(r.ci95 ** 2 for r in group) ** 0.5 / len(group)))
            group.clear()

    for result in results:
        setting = (result.shape, result.n_way, result.k_shot, result.q_query)
        if group and (result.source is None or setting != (
                group[0].shape, group[0].n_way, group[0].k_shot, group[0].q_query)):
            close()
        out.append(result)
        if result.source is not None:
            group.append(result)
    close()
    return out
