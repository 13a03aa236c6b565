"""Which training steps reach the loggers, so that nothing else reads values on the others.

Lightning writes a step's metrics to the loggers every ``trainer.log_every_n_steps`` steps.
Values logged on the steps in between are never written, yet each ``self.log`` costs about a
millisecond of host time (Lightning moves its result object to the device on every call), and
reading a GPU value on the host stalls the device. Regimes log their training metrics, the
progress bars refresh them and the NaN guard looks at the loss only on the steps chosen here.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


def logs_this_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the training step on ``batch_idx`` (running now) has its metrics written:
    Lightning's own choice (every ``log_every_n_steps``, and when training stops), plus the
    last batch of each epoch, so that callbacks reading metrics at the epoch's end see its
    final values. The same answer from ``training_step`` to ``on_train_batch_end``."""
    if trainer.fast_dev_run:
        return True
    total = trainer.num_training_batches
    if isinstance(total, int) and batch_idx + 1 >= total:
        return True
    # `should_update_logs` is what Lightning itself asks before writing a training step's
    # metrics; a Lightning without it logs every step, and so does this.
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value on ``device`` from the host costs nothing: on the CPU it is
    already there; on an accelerator the host waits for the device to catch up."""
    return device.type == "cpu"


def checks_this_step(trainer: pl.Trainer, batch_idx: int, device: torch.device) -> bool:
    """Whether a check that reads values on ``device`` (a NaN check naming what went wrong)
    runs on this training step: every step where reads are free, else on logging steps."""
    return reads_are_free(device) or logs_this_step(trainer, batch_idx)
