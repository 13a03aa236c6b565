"""An evaluation as a W&B run of its own, linked to the training run of its checkpoint.

``sharebone-eval`` with ``logger=wandb`` (the default, as for training; offline without
credentials, never fatal) writes one run per evaluation:

- project: ``logger.wandb.project`` when given on the command line, else the training run's
  (the checkpoint's config records it), so an evaluation sits next to the run it scores;
- ``job_type=eval``, group: the training run's W&B id, read from the run directory's
  ``wandb/`` folder (:func:`sharebone.tracking.wandb_run_id`), so every evaluation of one
  checkpoint is one group; name ``eval-<regime>-<task>-<split>-<time>``; tags ``eval`` and
  the training run's own (regime, task, backbone, training setting);
- config: the evaluation's (checkpoint, task, settings, episodes, queries, seed, split...)
  plus ``train_run_id``, ``train_run_name`` and ``train_run_dir``. Offline there is no W&B API
  to look the training run up with, so the link is these values;
- summary: ``test/<n>w<k>s/<metric>`` and ``test/<n>w<k>s/ci95``, the names training uses;
  the table ``test/results`` (a row per setting) and the figure ``test/<metric>_vs_shots``.

``sharebone-eval tasks=[a, b]`` is one such run for all its tasks (name
``eval-<regime>-tasks-<split>-<time>``, tagged with every task): ``test/<task>/<setting>/...``
and one table ``test/results`` with a row per task and setting, its input conversion beside
it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from sharebone import tracking
from sharebone.checkpoint_io import run_dir_of
from sharebone.evaluation.stats import FewShotResult
from sharebone.tracking import dashboard


def training_run(checkpoint: str | Path, run_config: Mapping[str, Any] | None,
                 wandb_run_id: str | None = None) -> dict[str, Any]:
    """What links an evaluation to the run that trained ``checkpoint``: its W&B id (the one
    recorded in the checkpoint, else the newest in the run directory; None when it ran
    without W&B), name, project, tags and run directory.

    The name is the one the user gave, or the one ``sharebone-train`` gives a run in a Hydra
    ``<date>/<time>`` directory; None where it cannot be known from the checkpoint (a sweep
    job's name, a run named by the time it started in another directory): the id links."""
    cfg = dict(run_config or {})
    run_dir = run_dir_of(checkpoint)
    options = dict((cfg.get("logger") or {}).get("wandb") or {})
    name = options.get("name")
    trained_in = (cfg.get("paths") or {}).get("output_dir")
    if not name and trained_in and dashboard.hydra_run_time(trained_in):
        name = dashboard.run_name(cfg, trained_in)
    return {"train_run_id": wandb_run_id or tracking.wandb_run_id(run_dir), "train_run_name": name,
            "train_project": options.get("project"), "train_run_dir": str(run_dir),
            "train_tags": dashboard.run_tags(cfg)}


def given_on_command_line(key: str) -> bool:
    """Whether ``key=...`` is one of the overrides this app was started with."""
    if not HydraConfig.initialized():
        return False
    overrides = HydraConfig.get().overrides.task
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def wandb_options(logger: Mapping[str, Any] | None, link: Mapping[str, Any], regime: str,
                  task: str, split: str) -> dict[str, Any] | None:
    """The ``logger.wandb`` options of an evaluation's run (see the module's text); None when
    the ``logger`` group has no W&B (``logger=none``, ``logger=csv``: the results are CSV
    files already)."""
    if not logger or "wandb" not in logger:
        return None
    options = dict(logger["wandb"] or {})
    if link.get("train_project") and not given_on_command_line("logger.wandb.project"):
        options["project"] = link["train_project"]
    options["group"] = options.get("group") or link.get("train_run_id")
    options["name"] = options.get("name") or \
        f"eval-{regime}-{task}-{split}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    tags = [str(t) for t in options.get("tags") or []]
    options["tags"] = list(dict.fromkeys([*tags, "eval", *link.get("train_tags", []), task]))
    options["job_type"] = "eval"
    return options


def start(options: Mapping[str, Any] | None, output_dir: str | Path) -> list[Any]:
    """The evaluation's W&B logger (written under ``output_dir/wandb``), or none when W&B is
    off or could not start (a warning, never an error)."""
    if options is None:
        return []
    # build_loggers falls back to a CSV logger when W&B cannot start; an evaluation's
    # results are CSV files already, so only a W&B logger is kept.
    return tracking.wandb_loggers(tracking.build_loggers({"wandb": dict(options)}, output_dir))


def log_evaluation(loggers: Sequence[Any], config: Mapping[str, Any],
                   results: Sequence[FewShotResult], figure: Path | None = None,
                   title: str = "", tasks: Sequence[Mapping[str, Any]] | None = None
                   ) -> list[str]:
    """Config, summary metrics, result table and score-vs-shots figure (also written to
    ``figure`` as a PNG, with or without W&B); closes the runs and returns the lines saying
    how to upload runs written offline.

    ``tasks`` (``sharebone-eval tasks=[...]``): each result's ``{"task", "conversion"}``; the
    metrics are then ``test/<task>/<setting>/<metric>``, the table has a row per task and
    setting, and there is no figure (its settings are one task's)."""
    for logger in loggers:
        tracking.safely(logger.log_hyperparams, dict(config))
    columns = list(tasks) if tasks is not None else [{} for _ in results]
    metrics: dict[str, float] = {}
    for c, r in zip(columns, results, strict=True):
        name = f"{c['task']}/{r.name}" if c else r.name
        metrics[f"test/{name}/{r.metric}"] = r.mean
        metrics[f"test/{name}/ci95"] = r.ci95
    tracking.log_summary(loggers, metrics)
    tracking.log_table(loggers, "test/results",
                       [{**c, **r.as_dict()} for c, r in zip(columns, results, strict=True)])
    if results and tasks is None and (figure is not None or loggers):
        try:
            from sharebone.tracking.figures import accuracy_vs_shots

            fig = accuracy_vs_shots(results, title=title)
            if fig is not None:
                dashboard.log_figure(loggers, f"test/{results[0].metric}_vs_shots", fig, figure)
        except Exception as err:  # noqa: BLE001 - a picture must never lose the results
            warnings.warn(f"Figure test/{results[0].metric}_vs_shots failed "
                          f"({type(err).__name__}: {err}); the results are written.",
                          tracking.TrackingWarning, stacklevel=2)
    return tracking.finish(loggers)
