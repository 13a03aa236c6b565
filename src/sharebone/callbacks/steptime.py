"""Where a training step's time goes: waiting for the meta-batch, or computing on it."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class StepTimes(pl.Callback):
    """Per epoch, the mean host time of a training step split in two and logged:

    - ``perf/data_ms``: from the end of one step to the start of the next: drawing the
      meta-batch, moving it to the model's device and preparing it there (augmentation);
    - ``perf/step_ms``: the step itself (forward, backward, optimizer);
    - ``perf/data_fraction``: the first over their sum. Near 0, the loader keeps up; a large
      fraction on a GPU is what ``sampler.images_on_device`` (or ``num_workers``) is for.

    Host clocks only: nothing waits for the GPU to measure them (a step's GPU work shows up
    where the host next waits for it), so the training loop is not slowed by a sync.
    """

    def __init__(self) -> None:
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.data_s = self.step_s = 0.0
        self.steps = 0
        self._last_end = self._start = now

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self.data_s += self._start - self._last_end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_end = time.perf_counter()
        self.step_s += self._last_end - self._start
        self.steps += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.steps or not trainer.loggers:  # logger=none: nowhere to report it
            return
        total = self.data_s + self.step_s
        pl_module.log_dict({"perf/data_ms": 1000 * self.data_s / self.steps,
                            "perf/step_ms": 1000 * self.step_s / self.steps,
                            "perf/data_fraction": self.data_s / total if total else 0.0},
                           on_epoch=True, on_step=False, logger=True, prog_bar=False)
