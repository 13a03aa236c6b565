"""Experiment tracking: W&B first (offline without credentials), CSV as the fallback.

A tracking failure must never lose a training run: anything that goes wrong while setting up
or writing to W&B is reported as a warning and the run goes on with a CSV logger.
"""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str = "auto") -> str:
    """``online`` only with credentials; ``WANDB_MODE`` in the environment wins over config."""
    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "disabled", "online"):
        return env
    if requested in ("online", "offline", "disabled"):
        return "offline" if requested == "online" and not has_wandb_credentials() else requested
    return "online" if has_wandb_credentials() else "offline"


def build_loggers(cfg: Mapping[str, Any] | None, output_dir: str | Path) -> list[Logger]:
    """Loggers from the ``logger`` config group: ``{"wandb": {...}, "csv": {...}}``.

    W&B is written offline when there are no credentials; when it cannot start at all the
    run logs to CSV in ``output_dir`` instead.
    """
    cfg = dict(cfg or {})
    loggers: list[Logger] = []
    if "wandb" in cfg:
        options = dict(cfg["wandb"] or {})
        mode = wandb_mode(options.pop("mode", "auto"))
        if mode != "disabled":
            try:
                logger = WandbLogger(save_dir=str(output_dir), offline=mode == "offline",
                                     log_model=False, **options)
                _ = logger.experiment  # start the run now, so a failure is caught here
                loggers.append(logger)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                warnings.warn(f"W&B could not start ({err}); logging to CSV in {output_dir}.",
                              stacklevel=2)
                cfg.setdefault("csv", {})
    if "csv" in cfg:
        loggers.append(CSVLogger(save_dir=str(output_dir), name="csv", version="",
                                 **dict(cfg["csv"] or {})))
    return loggers


def wandb_loggers(loggers: Sequence[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def log_summary(loggers: Sequence[Logger], metrics: Mapping[str, float]) -> None:
    """Final numbers: metrics for every logger, run summary on W&B (shown in run tables)."""
    for logger in loggers:
        _safely(logger.log_metrics, dict(metrics))
    for logger in wandb_loggers(loggers):
        _safely(logger.experiment.summary.update, dict(metrics))


def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A result table (one dict per row) on W&B."""
    if not rows:
        return
    columns = list(rows[0])
    data = [[row[c] for c in columns] for row in rows]
    for logger in wandb_loggers(loggers):
        _safely(logger.log_table, key=key, columns=columns, data=data)


def log_checkpoint(loggers: Sequence[Logger], path: str | Path, name: str,
                   metadata: Mapping[str, Any] | None = None) -> None:
    """The checkpoint as a W&B ``model`` artifact (kept locally offline, uploaded by sync)."""
    import wandb

    for logger in wandb_loggers(loggers):
        def upload(logger=logger) -> None:
            artifact = wandb.Artifact(name=name, type="model", metadata=dict(metadata or {}))
            artifact.add_file(str(path))
            logger.experiment.log_artifact(artifact, aliases=["latest"])

        _safely(upload)


def finish(loggers: Sequence[Logger]) -> list[str]:
    """Close W&B runs; return a line per offline run with the command that uploads it."""
    import wandb

    notes = []
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        offline = getattr(run.settings, "mode", "") == "offline" or run.offline
        _safely(run.finish)
        if offline and run_dir is not None:
            notes.append(f"W&B run written offline to {run_dir}; "
                         f"upload it with: wandb sync {run_dir}")
    if wandb.run is not None:
        _safely(wandb.finish)
    return notes


def _safely(fn, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        warnings.warn(f"Tracking call {getattr(fn, '__name__', fn)} failed: {err}", stacklevel=2)
