"""Training progress: a rich or tqdm bar on a terminal, plain lines everywhere else.

A bar redrawn in place is unreadable under ``nohup``, in a SLURM ``.out`` file or a CI log:
there :func:`progress_bar` gives :class:`LineProgressBar`, a log line every few seconds (as the
test-episode progress does), so it is in the run's ``train.log`` too.

Every bar shows the training metrics the loggers last got (:class:`TrainMetricsShown`), not
Lightning's per-step progress-bar metrics: those are read on the host at every step, which on
a GPU makes the host wait for the device each step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar

from sharebone.callbacks.cadence import logs_this_step
from sharebone.errors import SettingError

log = logging.getLogger(__name__)

STYLES = ("rich", "tqdm")


def progress_bar(style: str = "tqdm", refresh_rate: int = 1, every_seconds: float = 30.0,
                 stream: TextIO | None = None) -> ProgressBar:
    """The ``style`` bar (``rich`` or ``tqdm``) when ``stream`` (stdout) is a terminal, else
    :class:`LineProgressBar` logging a line every ``every_seconds``."""
    if style not in STYLES:
        raise SettingError(f"progress bar style must be one of {STYLES}, got {style!r}.")
    stream = stream or sys.stdout
    if not stream.isatty():
        return LineProgressBar(every_seconds)
    if style == "rich":
        return RichBar(refresh_rate=refresh_rate)
    return TQDMBar(refresh_rate=refresh_rate)


def shown_on_bar(key: str) -> bool:
    """A run's headline training metrics (``train/loss``, ``train/acc``), not per-task ones."""
    return key.startswith("train/") and key.count("/") == 1


def scalars(metrics: dict[str, Any], keep: Callable[[str], bool]) -> dict[str, float]:
    """The one-number metrics whose key ``keep`` accepts, as floats (a read per value)."""
    return {k: float(v) for k, v in metrics.items()
            if keep(k) and getattr(v, "numel", lambda: 1)() == 1}


class TrainMetricsShown(ProgressBar):
    """A progress bar showing the training metrics as the loggers last got them: read once
    per logging step (:func:`sharebone.callbacks.cadence.logs_this_step`), when the regime logs
    them."""

    _train_shown: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if logs_this_step(trainer, batch_idx):
            self._train_shown = scalars(trainer.callback_metrics, shown_on_bar)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer,
                    pl_module: pl.LightningModule) -> dict[str, int | str | float | dict]:
        return {**super().get_metrics(trainer, pl_module), **(self._train_shown or {})}


class RichBar(TrainMetricsShown, RichProgressBar):
    """Lightning's rich bar, with the training metrics of :class:`TrainMetricsShown`."""


class TQDMBar(TrainMetricsShown, TQDMProgressBar):
    """Lightning's tqdm bar, with the training metrics of :class:`TrainMetricsShown`."""


class LineProgressBar(TrainMetricsShown):
    """``epoch 2/10: 120/500 steps, 8.1 steps/s, ETA 47s, train/loss=0.52`` every
    ``every_seconds`` and at each epoch's end, and a line per validation with its metrics,
    logged (INFO): on the console and in ``train.log`` under the Hydra app."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every = every_seconds
        self._enabled = True
        self._started = self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        if self._enabled:
            log.info("%s", line)

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        shown = []
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key == "v_num":
                continue
            shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return ", ".join(shown)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        total = self.total_train_batches
        done = batch_idx + 1
        now = time.perf_counter()
        last = isinstance(total, int | float) and done >= total
        if not last and now - self._last < self.every:
            return
        self._last = now
        rate = done / max(now - self._started, 1e-9)
        of = f"/{int(total)}" if isinstance(total, int | float) and total != float("inf") else ""
        eta = (f", ETA {(total - done) / rate:.0f}s" if of and not last else
               f", {now - self._started:.1f}s" if last else "")
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        metrics = self._metrics(trainer, pl_module)
        self._print(f"epoch {trainer.current_epoch + 1}{epochs}: {done}{of} steps, "
                    f"{rate:.2f} steps/s{eta}" + (f", {metrics}" if metrics else ""))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        shown = scalars(trainer.callback_metrics, lambda k: k.startswith("val/"))
        if shown:
            self._print(f"validation after epoch {trainer.current_epoch + 1}: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
