"""Experiment tracking: W&B first (offline without credentials), CSV as the fallback;
TensorBoard on request. The loggers live here; :mod:`sharebone.tracking.dashboard` names, tags
and summarises runs, :mod:`sharebone.tracking.figures` draws the run's figures and
:mod:`sharebone.tracking.eval_run` makes an evaluation a W&B run of its own.

A tracking failure must never lose a training run. W&B runs through :class:`SafeWandbLogger`:
the first W&B call that fails (the ``wandb-core`` service killed, a full disk, a bad value)
gives one warning, ends W&B for the rest of the run, and from then on its metrics go to a CSV
logger in the run directory. Training, checkpoints and results go on regardless.

A run resumed in its own directory (``resume=<that dir>``) continues its logs there: the W&B
run of the same id (:func:`wandb_run_id`) and ``csv/metrics.csv`` with its earlier rows.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import netrc
import numbers
import os
import re
import sys
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from sharebone.errors import SettingError
from sharebone.tracking import deadline as wandb_deadline

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


class TrackingWarning(UserWarning):
    """A tracking call failed; the run goes on without it."""


def safely(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a failure turned into a warning (and ``None``)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        warnings.warn(f"Tracking call {getattr(fn, '__name__', fn)} failed: {err}",
                      TrackingWarning, stacklevel=2)
        return None




# --------------------------------------------------------------------------------------------
# CSV that continues a resumed run


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, made safe to share a file and to resume one.

    - Resuming, it keeps the rows written before: Lightning deletes ``metrics.csv`` when its
      writer starts; this one reads the old rows and leaves the file alone until the resumed
      trainer logs its first step ``s`` (:meth:`resume_at`). The file is then rewritten with
      the old rows of steps before ``s`` (those after were logged past the checkpoint and are
      logged again now). A row cut short by a kill is dropped.
    - Every save appends under the file's own header, widened (the file rewritten) when rows
      bring new columns. Lightning's writer assumes it alone writes the file: under
      ``ddp_spawn`` the main process and the rank-0 worker both do, and Lightning's rewrite
      with the main process's narrower header failed half-way, leaving a header and no rows.
    - Rewrites go to a temporary file renamed over the old one: a kill leaves one or the other.
    """

    def __init__(self, log_dir: str, resume: bool) -> None:
        self._resume = resume
        super().__init__(log_dir)
        self._earlier: list[dict[str, str]] | None = None
        if resume and self._fs.isfile(self.metrics_file_path):
            self.metrics_keys, self._earlier = _read_metrics(self._fs, self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:
        if not self._resume:
            super()._check_log_dir_exists()

    def resume_at(self, step: float) -> None:
        """The resumed trainer logs step ``step`` first: keep the old rows before it."""
        if self._earlier is None:
            return
        kept = [row for row in self._earlier if float(row["step"]) < step]
        self._earlier = None
        self._rewrite(self.metrics_keys, kept)

    def save(self) -> None:
        if self._earlier is not None or not self.metrics:
            return  # until a resumed run's first step is known, rows wait
        header: list[str] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
        columns = set(header) | set(self.metrics_keys) | set().union(*self.metrics)
        if header and columns != set(header):
            _, rows = _read_metrics(self._fs, self.metrics_file_path)
            header = sorted(columns)
            self._rewrite(header, rows)
        self.metrics_keys = header or sorted(columns)
        with self._fs.open(self.metrics_file_path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            if not header:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def _rewrite(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(tmp, self.metrics_file_path)


def _read_metrics(fs: Any, path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows of a ``metrics.csv`` (not a last line a kill cut short)."""
    with fs.open(path, "r", newline="") as file:
        text = file.read()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    reader = csv.DictReader(lines)
    header = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        if None in row or None in row.values():
            continue
        try:
            float(row.get("step", ""))
        except ValueError:
            continue
        rows.append(row)
    return header, rows


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; with ``resume=True`` it continues the ``metrics.csv`` there."""

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume = resume

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir, resume=self._resume)
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is not None:  # the trainer's steps (tracking's own summaries come without)
            self.experiment.resume_at(step)
        super().log_metrics(dict(metrics), step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if isinstance(self._experiment, _ResumingWriter):
            self._experiment.resume_at(math.inf)  # nothing logged a step: keep every old row
        super().finalize(status)


# --------------------------------------------------------------------------------------------
# W&B that cannot stop a run


class _NoExperiment:
    """``SafeWandbLogger.experiment`` once W&B has failed: any attribute, call or item is a
    no-op, so code that logs through ``logger.experiment`` does not stop the run either."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NoExperiment:
        return self

    def __getitem__(self, key: Any) -> _NoExperiment:
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __bool__(self) -> bool:
        return False


#: Values a guarded run hands out as they are (anything else is wrapped: run.summary, ...).
_PLAIN = (str, bytes, int, float, bool, type(None), tuple, list, dict, Path)


class _GuardedRun:
    """The W&B run as ``SafeWandbLogger.experiment`` hands it out: it reads and calls through
    to the run, but a call that fails ends W&B for the run (as the logger's own calls do)
    instead of raising into training code (``self.logger.experiment.log(...)`` in a module).
    """

    __slots__ = ("_target", "_logger")

    def __init__(self, target: Any, logger: SafeWandbLogger) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_logger", logger)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._logger.failed:
            return None
        return self._logger._attempt(what, fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            value = getattr(self._target, name)
        except AttributeError:
            raise
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._logger._fail(name, err)
            return _NoExperiment()
        if callable(value) and not isinstance(value, type):
            return functools.wraps(value)(functools.partial(self._call, name, value))
        return value if isinstance(value, _PLAIN) else _GuardedRun(value, self._logger)

    def __setattr__(self, name: str, value: Any) -> None:
        self._call(name, setattr, self._target, name, value)

    def __getitem__(self, key: Any) -> Any:
        return self._call("__getitem__", self._target.__getitem__, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call("__setitem__", self._target.__setitem__, key, value)

    def __repr__(self) -> str:
        return f"<guarded {self._target!r}>"


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """A ``WandbLogger`` method that, once W&B failed or when it fails, does nothing."""

    @functools.wraps(method)
    def call(self: SafeWandbLogger, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        return self._attempt(method.__name__, method, self, *args, **kwargs)

    return call


class SafeWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, never fatal.

    Every call Lightning or sharebone makes to it is guarded. The first failure warns once
    (:class:`TrackingWarning`), ends W&B for this run (the ``wandb`` library is torn down, so a
    later run in the same process, e.g. the next job of a sweep, starts a fresh W&B service)
    and, with ``fallback_dir`` set, writes the hyperparameters, the metric rows sent to W&B so
    far (a killed service loses what it had not written) and all later metrics to a
    :class:`ResumableCSVLogger` at ``<fallback_dir>/csv``. ``experiment`` is then a no-op
    object. Use :meth:`start` to start the run and see a failure (``experiment`` hides it).
    A call that waits on the service longer than ``timeout`` seconds
    (:mod:`sharebone.tracking.deadline`) is such a failure: the service is ended, the call fails.
    """

    REPLAY_ROWS = 100_000

    def __init__(self, *args: Any, fallback_dir: str | Path | None = None,
                 resume: bool = False, timeout: float | None = None, **kwargs: Any) -> None:
        self.timeout = wandb_deadline.call_timeout(timeout)
        super().__init__(*args, **kwargs)
        # Lightning passes anonymous=None through; wandb 0.31 warns about any value it gets.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.failed = False
        self.fallback: ResumableCSVLogger | None = None
        self._fallback_dir = None if fallback_dir is None else str(fallback_dir)
        self._resume = resume
        self._hparams: dict[str, Any] = {}
        self._summarised: set[str] = set()
        #: Metric rows sent to W&B, for the CSV fallback should W&B fail (the newest
        #: ``REPLAY_ROWS``; nothing is kept when there is no fallback).
        self._sent: deque[tuple[dict[str, Any], int | None]] = deque(
            maxlen=self.REPLAY_ROWS if fallback_dir is not None else 0)

    def start(self) -> Any:
        """Start the W&B run now; raises what ``wandb.init`` raises, and TimeoutError when
        the service did not answer within ``timeout`` (the service is ended then)."""
        with wandb_deadline.limit(self.timeout, "init") as watch:
            try:
                run = WandbLogger.experiment.fget(self)
            except Exception as err:
                raise (watch.hung or err) from err
        if watch.hung:
            raise watch.hung
        return run

    @property
    def experiment(self) -> Any:
        """The run, guarded (:class:`_GuardedRun`); a no-op object once W&B has failed."""
        if self.failed:
            return _NoExperiment()
        run = self._attempt("experiment", WandbLogger.experiment.fget, self)
        return _NoExperiment() if self.failed or run is None else _GuardedRun(run, self)

    def _attempt(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` within the time limit; a failure, or a service that did not
        answer in time (then ended), ends W&B for the run (:meth:`_fail`) and gives None."""
        with wandb_deadline.limit(self.timeout, what) as watch:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                result, failure = None, err
            else:
                failure = None
        if watch.hung or failure is not None:
            self._fail(what, watch.hung or failure)
            return None
        return result

    def _fail(self, what: str, err: BaseException) -> None:
        if self.failed:
            return
        self.failed = True
        if self._fallback_dir is not None:
            where = (f"its metrics, from the run's start, go on to "
                     f"{Path(self._fallback_dir) / 'csv' / 'metrics.csv'}")
        else:
            where = "the run's CSV logger goes on recording metrics"
        warnings.warn(f"W&B failed in {what} ({type(err).__name__}: {err}); W&B logging is off "
                      f"for the rest of this run, {where}. The run goes on.",
                      TrackingWarning, stacklevel=3)
        _drop_wandb_service(self._experiment, self.timeout)
        sent, self._sent = self._sent, deque()
        if self._fallback_dir is None:
            return
        self.fallback = safely(ResumableCSVLogger, self._fallback_dir, name="csv", version="",
                               resume=self._resume)
        if self.fallback is None:
            return
        # A killed W&B service loses what it had not written yet (a short run: everything),
        # so the CSV gets the rows sent to W&B so far too, the failed call's included.
        if self._hparams:
            safely(self.fallback.log_hyperparams, self._hparams)
        for metrics, step in sent:
            if metrics:
                safely(self.fallback.log_metrics, metrics, step)
        safely(self.fallback.save)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if isinstance(params, Mapping) or hasattr(params, "__dict__"):
            self._hparams.update(params if isinstance(params, Mapping) else vars(params))
        if not self.failed:  # a failure hands self._hparams to the fallback
            self._attempt("log_hyperparams", WandbLogger.log_hyperparams, self, params)
        elif self.fallback is not None:
            safely(self.fallback.log_hyperparams, params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.failed:
            self._sent.append((_numbers(metrics), step))  # a failure hands them to the CSV
            self._attempt("log_metrics", WandbLogger.log_metrics, self, metrics, step)
        elif self.fallback is not None:
            safely(self.fallback.log_metrics, _numbers(metrics), step)

    @rank_zero_only
    def save(self) -> None:
        if self.fallback is not None:
            safely(self.fallback.save)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self.failed:
            self._attempt("finalize", WandbLogger.finalize, self, status)
        if self.fallback is not None:
            safely(self.fallback.finalize, status)

    after_save_checkpoint = _guarded(WandbLogger.after_save_checkpoint)
    log_table = _guarded(WandbLogger.log_table)
    log_text = _guarded(WandbLogger.log_text)
    log_image = _guarded(WandbLogger.log_image)
    log_audio = _guarded(WandbLogger.log_audio)
    log_video = _guarded(WandbLogger.log_video)
    watch = _guarded(WandbLogger.watch)
    use_artifact = _guarded(WandbLogger.use_artifact)

    @_guarded
    def define_summary(self, key: str, summary: str) -> None:
        """``key``'s run summary is ``summary`` of its history (``"max"``, ``"min"``...), not
        its last value; :meth:`update_summary` leaves it alone from now on."""
        self.experiment.define_metric(key, step_metric="trainer/global_step", step_sync=True,
                                      summary=summary)
        self._summarised.add(key)

    @_guarded
    def update_summary(self, metrics: Mapping[str, Any]) -> None:
        """Into the run summary (shown in W&B's run tables); keys with a defined summary
        (:meth:`define_summary`) keep it."""
        self.experiment.summary.update({k: v for k, v in metrics.items()
                                        if k not in self._summarised})

    @_guarded
    def log_file_artifact(self, path: str | Path, name: str, type: str = "model",
                          metadata: Mapping[str, Any] | None = None) -> None:
        """``path`` as a W&B artifact (kept locally offline, uploaded by ``wandb sync``)."""
        import wandb

        artifact = wandb.Artifact(name=name, type=type, metadata=dict(metadata or {}))
        artifact.add_file(str(path))
        self.experiment.log_artifact(artifact, aliases=["latest"])

    def finish(self) -> str | None:
        """Close the run; for a run written offline, a line with the command that uploads it.

        A dead W&B service makes this fail at once (it does not wait for it); one that is
        alive but does not answer (e.g. stopped with SIGSTOP) is ended after ``timeout``.
        """
        run = self._experiment
        note = None
        if run is not None and not isinstance(run, _NoExperiment):
            try:
                run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
                offline = getattr(run.settings, "mode", "") == "offline" or run.offline
            except Exception:  # noqa: BLE001 - only for the note
                run_dir, offline = None, False
            if not self.failed:
                self._attempt("finish", run.finish)
            if offline and run_dir is not None:
                cut = " (cut short: W&B failed during the run)" if self.failed else ""
                note = (f"W&B run written offline to {run_dir}{cut}; "
                        f"upload it with: wandb sync {run_dir}")
        if self.fallback is not None:
            safely(self.fallback.finalize, "success")
        return note


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The values a CSV can hold: numbers, one-element tensors (not W&B tables, images...)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, numbers.Real) or (isinstance(v, Tensor) and v.numel() == 1)}


def _drop_wandb_service(run: Any = None, timeout: float | None = None) -> None:
    """After a W&B failure: let go of W&B in this process. ``run`` is finished (at once, with
    a dead service: it fails) and stops being ``wandb.run``, else the next ``WandbLogger``
    of this process (the next job of a sweep) would take it over; then the ``wandb`` library
    is torn down, so the next ``wandb.init`` starts a new service and no exit hook tries the
    dead one again. Errors from a dead service are expected here; a service that does not
    answer within ``timeout`` is ended (:mod:`sharebone.tracking.deadline`)."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    seconds = wandb_deadline.call_timeout(timeout)
    if run is not None:
        try:
            with wandb_deadline.limit(seconds, "finish"):
                run.finish()
        except Exception as err:  # noqa: BLE001 - the service is gone; nothing left to close
            log.debug("finishing the W&B run after a W&B failure: %s", err)
        if getattr(wandb, "run", None) is run:
            try:
                from wandb.sdk.lib import module

                module.unset_globals()
            except Exception:  # noqa: BLE001 - another wandb version: the one that matters
                wandb.run = None
    try:
        with wandb_deadline.limit(seconds, "teardown"):
            wandb.teardown()
    except Exception as err:  # noqa: BLE001 - the service is gone; nothing left to close
        log.debug("wandb.teardown after a W&B failure: %s", err)


# --------------------------------------------------------------------------------------------
# The run's loggers


#: ``run-<timestamp>-<id>`` (online) and ``offline-run-<timestamp>-<id>`` in a ``wandb/`` folder.
_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


def wandb_run_id(output_dir: str | Path) -> str | None:
    """The id of the newest W&B run written in ``output_dir`` (its ``wandb/`` folder)."""
    found = []
    folder = Path(output_dir) / "wandb"
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        match = _RUN_DIR.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((match.group(1), path.stat().st_mtime, match.group(2)))
    return max(found)[2] if found else None


class WandbRunInCheckpoints(pl.Callback):
    """Writes the id of the W&B run that is training into every checkpoint
    (``checkpoint["sharebone"]["wandb_run_id"]``), so that a resume continues that run and an
    evaluation is grouped under it, whatever other W&B runs were written to the run directory
    since (an evaluation given ``output_dir=<run dir>``)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        for logger in wandb_loggers(trainer.loggers):
            if not logger.failed:
                checkpoint.setdefault("sharebone", {})["wandb_run_id"] = logger.version
                return


def build_loggers(cfg: Mapping[str, Any] | None, output_dir: str | Path, *,
                  resume: bool = False, resume_id: str | None = None) -> list[Logger]:
    """Loggers from the ``logger`` config group: ``{"wandb": {...}, "csv": {...},
    "tensorboard": {...}}``, any of them.

    W&B is written offline when there are no credentials; when it cannot start at all the
    run logs to CSV in ``output_dir`` instead, and when it fails later its metrics go there.
    ``resume=True`` continues the logs of the run in ``output_dir``: the CSV keeps its earlier
    rows, W&B continues the run ``resume_id`` (default: :func:`wandb_run_id` of the folder).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - {"wandb", "csv", "tensorboard"})
    if unknown:
        raise SettingError(f"logger: unknown logger(s) {unknown}; sharebone knows wandb, csv and "
                           "tensorboard (logger=wandb|csv|tensorboard|many|none, or a list: "
                           "logger=[csv,tensorboard]).")
    loggers: list[Logger] = []
    if resume and resume_id is None:
        resume_id = wandb_run_id(output_dir)
    if "wandb" in cfg:
        options = dict(cfg["wandb"] or {})
        mode = wandb_mode(options.pop("mode", "auto"))
        timeout = wandb_deadline.call_timeout(options.pop("timeout", None))  # refused before W&B
        if resume_id and not options.get("id"):
            options["id"] = resume_id  # WandbLogger asks W&B for resume="allow"
        if mode != "disabled":
            try:
                logger = SafeWandbLogger(save_dir=str(output_dir), offline=mode == "offline",
                                         log_model=False, resume=resume, timeout=timeout,
                                         fallback_dir=None if "csv" in cfg else output_dir,
                                         **options)
                logger.start()  # start the run now, so a failure to start is caught here
                loggers.append(logger)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                warnings.warn(f"W&B could not start ({err}); logging to CSV in {output_dir}.",
                              TrackingWarning, stacklevel=2)
                _drop_wandb_service(timeout=timeout)
                cfg.setdefault("csv", {})
    if "csv" in cfg:
        loggers.append(ResumableCSVLogger(save_dir=str(output_dir), name="csv", version="",
                                          resume=resume, **dict(cfg["csv"] or {})))
    if "tensorboard" in cfg:
        loggers.append(tensorboard_logger(output_dir, **dict(cfg["tensorboard"] or {})))
    return loggers


def tensorboard_logger(output_dir: str | Path, **options: Any) -> Logger:
    """Lightning's ``TensorBoardLogger`` writing to ``<output_dir>/tensorboard``. A resumed run
    adds event files to the same folder; TensorBoard shows them as one run."""
    import importlib.util

    if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        raise ModuleNotFoundError(
            "logger=tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install -e '.[tensorboard]'), or pick another logger (logger=csv).")
    from pytorch_lightning.loggers import TensorBoardLogger

    # No hp_metric placeholder: the run's metrics are logged under their own names.
    options.setdefault("default_hp_metric", False)
    return TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", **options)


def wandb_loggers(loggers: Sequence[Logger]) -> list[SafeWandbLogger]:
    """The W&B loggers among ``loggers`` (the never-fatal ones :func:`build_loggers` makes)."""
    return [lg for lg in loggers if isinstance(lg, SafeWandbLogger)]


def log_summary(loggers: Sequence[Logger], metrics: Mapping[str, float]) -> None:
    """Final numbers: metrics for every logger (written now), run summary on W&B."""
    for logger in loggers:
        safely(logger.log_metrics, dict(metrics))
        safely(logger.save)
    for logger in wandb_loggers(loggers):
        logger.update_summary(metrics)


def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A result table (one dict per row) on W&B."""
    if not rows:
        return
    columns = list(rows[0])
    data = [[row[c] for c in columns] for row in rows]
    for logger in wandb_loggers(loggers):
        logger.log_table(key=key, columns=columns, data=data)


def log_checkpoint(loggers: Sequence[Logger], path: str | Path, name: str,
                   metadata: Mapping[str, Any] | None = None) -> None:
    """The checkpoint as a W&B ``model`` artifact (kept locally offline, uploaded by sync)."""
    for logger in wandb_loggers(loggers):
        logger.log_file_artifact(path, name=name, type="model", metadata=metadata)


def finish(loggers: Sequence[Logger]) -> list[str]:
    """Close W&B runs, write what CSV loggers hold; a line per offline run with the command
    that uploads it."""
    notes = []
    for logger in loggers:
        if isinstance(logger, SafeWandbLogger):
            note = logger.finish()
            if note:
                notes.append(note)
        else:
            safely(logger.save)
    wandb = sys.modules.get("wandb")  # a run someone else started: never import W&B for it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with wandb_deadline.limit(wandb_deadline.call_timeout(), "finish"):
            safely(wandb.finish)
    return notes
