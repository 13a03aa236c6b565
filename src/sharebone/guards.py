"""Training that stops loudly instead of going on silently wrong."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

#: What to do when the training loss is NaN or infinite.
ON_NONFINITE = ("stop", "warn", "ignore")


class NonFiniteLossError(FloatingPointError):
    """The training loss went NaN or infinite; the message says where and what to try."""


class NonFiniteLoss(pl.Callback):
    """Checks the training loss before its backward pass, so a NaN never reaches the weights.

    ``stop`` (the default) raises :class:`NonFiniteLossError`: nothing more is trained or
    saved, and the run directory keeps its last good checkpoint (checkpoints are only ever
    written whole). ``warn`` warns once per run and goes on; ``ignore`` does nothing.
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite_loss must be one of {ON_NONFINITE}, got {action!r}.")
        self.action = action
        self._warned = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self.action == "ignore" or bool(torch.isfinite(loss.detach()).all()):
            return
        value = float(loss.detach().float().flatten()[0])
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.action == "warn":
            if not self._warned:
                warnings.warn(f"Training loss is {value} at {where}; going on as "
                              "on_nonfinite_loss=warn asks.", stacklevel=2)
                self._warned = True
            return
        raise NonFiniteLossError(
            f"Training loss is {value} at {where}: stopped before it reached the weights. "
            f"The last good checkpoint is in {_checkpoint_dir(trainer)}. Lower the learning "
            "rate, check the data (an empty or constant split?), or set on_nonfinite_loss=warn "
            "to carry on.")


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
