"""Training that stops loudly instead of going on silently wrong."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from sharebone.callbacks.cadence import logs_this_step, reads_are_free
from sharebone.errors import SettingError, ShareboneError

#: What to do when the training loss is NaN or infinite.
ON_NONFINITE = ("stop", "warn", "ignore")
#: When the host looks at it: ``step`` before every backward pass, ``logging`` on logging
#: steps and before checkpoints, ``auto`` the first on a CPU and the second elsewhere.
NONFINITE_CHECKS = {"step": False, "logging": True, "auto": None}


class NonFiniteLossError(ShareboneError, FloatingPointError):
    """The training loss went NaN or infinite; the message says where and what to try."""


class NonFiniteLoss(pl.Callback):
    """Stops training on a NaN or infinite loss, before a checkpoint can hold it.

    ``stop`` (the default) raises :class:`NonFiniteLossError`: nothing more is trained or
    saved, and the run directory keeps its last good checkpoint (checkpoints are only ever
    written whole). ``warn`` warns once per run and goes on; ``ignore`` does nothing.

    ``check`` is when the host looks (``auto``: ``step`` on a CPU, ``logging`` elsewhere).
    Reading the loss's finiteness is free on a CPU, so there every loss is checked before its
    backward pass (``step``) and a NaN never reaches the weights. On a GPU, that read would
    make the host wait for the device at every step; with ``logging`` the check is kept on
    the device (the first bad step and its loss) and read on logging steps
    (:func:`sharebone.callbacks.cadence.logs_this_step`, where the loggers read values anyway),
    before
    every checkpoint is written and at each epoch's end. A NaN then reaches the weights for
    at most ``log_every_n_steps`` steps, and never a checkpoint.
    """

    def __init__(self, action: str = "stop", check: str = "auto") -> None:
        if action not in ON_NONFINITE:
            raise SettingError(f"on_nonfinite_loss must be one of {ON_NONFINITE}, got {action!r}.")
        if check not in NONFINITE_CHECKS:
            raise SettingError(f"nonfinite_check must be one of {tuple(NONFINITE_CHECKS)}, got "
                               f"{check!r}.")
        self.action = action
        self.deferred = NONFINITE_CHECKS[check]
        self._warned = False
        self._first: torch.Tensor | None = None  # [step, loss] of the first bad loss, or -1

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self.action == "ignore" or (self._warned and self.action == "warn"):
            return
        loss = loss.detach()
        deferred = self.deferred if self.deferred is not None else not reads_are_free(loss.device)
        if not deferred:
            if not bool(torch.isfinite(loss).all()):
                self._report(trainer.global_step, float(loss.float().flatten()[0]), trainer)
            return
        # On the device: remember the first bad step and its loss without reading them.
        bad = ~torch.isfinite(loss).all()
        now = torch.stack([torch.full((), trainer.global_step, dtype=torch.float64,
                                      device=loss.device), loss.double().flatten()[0]])
        if self._first is None:
            self._first = torch.full_like(now, -1.0)
        self._first = torch.where(bad & (self._first[0] < 0), now, self._first)

    def check(self, trainer: pl.Trainer) -> None:
        """Read the deferred check now (one host sync) and act on a bad loss."""
        if self._first is None:
            return
        step, value = self._first.tolist()
        self._first = None
        if step >= 0:
            self._report(int(step), value, trainer, found=trainer.global_step)

    def _report(self, step: int, value: float, trainer: pl.Trainer,
                found: int | None = None) -> None:
        where = f"step {step} (epoch {trainer.current_epoch})"
        if self.action == "warn":
            if not self._warned:
                warnings.warn(f"Training loss is {value} at {where}; going on as "
                              "on_nonfinite_loss=warn asks.", stacklevel=2)
                self._warned = True
            return
        late = ("" if found is None else
                f" (seen at step {found}: on a GPU the loss is checked on logging steps, so as "
                "not to make the host wait for the device at every step; no checkpoint was "
                "written since)")
        stopped = "stopped before it reached the weights" if found is None else "stopped"
        raise NonFiniteLossError(
            f"Training loss is {value} at {where}{late}: {stopped}. The last good checkpoint "
            f"is in {_checkpoint_dir(trainer)}. Lower the learning rate, check the data (an "
            "empty or constant split?), or set on_nonfinite_loss=warn to carry on.")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if logs_this_step(trainer, batch_idx):
            self.check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.check(trainer)  # raising here writes nothing: the last good checkpoint stays

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)


def _checkpoint_dir(trainer: pl.Trainer) -> Any:
    callback = getattr(trainer, "checkpoint_callback", None)
    return getattr(callback, "dirpath", None) or trainer.default_root_dir


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None``: what JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value
