"""Where a training loop makes the host wait for the device.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``, printing it) blocks the Python thread until every queued kernel has
run. One such read per step is enough to stop the host from queueing the next step's kernels
while the device works on this one, and the loop runs at launch speed plus compute speed
instead of the slower of the two. :class:`HostSyncs` finds those reads on any device (a CPU
too, where they cost nothing yet), with the line of code that made each one:

    sharebone-train ... callbacks=[default,host_syncs]

logs, at the end of training, how many reads each line made per training step. CUDA's own
check (``torch.cuda.set_sync_debug_mode``) sees only a GPU and only some operations.
"""

from __future__ import annotations

import collections
import logging
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

#: Tensor methods and functions that hand a device tensor's value (or its shape, for data-
#: dependent ops) to the host, so the host waits for the device.
SYNCING = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "__format__", "__repr__", "nonzero", "masked_select", "unique", "allclose", "equal",
})

# Frames in torch are plumbing; the line reported is the first frame outside it (the regime,
# callback or Lightning line that asked for the value).
_TORCH_DIR = str(Path(torch.__file__).parent)
_HERE = str(Path(__file__))
# torch's optimizers keep their step counts on the host (unless ``capturable``) and read them
# there: never a wait for the device, though a CPU run cannot tell them from one.
_OPTIMIZERS = str(Path(torch.__file__).parent / "optim")
# sharebone's samplers read the host's episode indices (a bounds check). That is all they
# read: tests draw episodes on the `meta` device, where any read of a value fails.
_DATA = str(Path(__file__).parents[1] / "data")


def _caller(on_host_too: bool) -> str | None:
    """Where the read was made, or None for a read that is host-side by construction (the
    optimizers' step counts; with ``on_host_too``, the samplers' indices too)."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        if frame.filename == _HERE:
            continue
        if frame.filename.startswith(_OPTIMIZERS) or (
                on_host_too and frame.filename.startswith(_DATA)):
            return None
        if not frame.filename.startswith(_TORCH_DIR):
            return f"{_short(frame.filename)}:{frame.lineno} ({frame.name})"
    return "<unknown>"


def _short(filename: str) -> str:
    """A library file from its package on, a project file from its folder."""
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    path = Path(filename)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else filename


class SyncCounter(TorchFunctionMode):
    """A torch function mode that counts host reads of tensor values by the line that made
    them (``counts``), while it is active.

    ``device_only``: count reads of tensors on an accelerator only (exact on a GPU run). Off
    (a CPU run), every read counts but those made of what stays on the host on a GPU run too
    (the optimizers' step counts, the samplers' episode indices).
    """

    def __init__(self, device_only: bool = False) -> None:
        super().__init__()
        self.device_only = device_only
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", None) in SYNCING and self._on_device(args):
            where = _caller(not self.device_only)
            if where is not None:
                self.counts[where] += 1
        return func(*args, **(kwargs or {}))

    def _on_device(self, args: tuple) -> bool:
        if not self.device_only:
            return True
        return bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has run everything queued on it (a CUDA device; others run
    synchronously): what a benchmark brackets its timed region with, never a training step."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostSyncs(pl.Callback):
    """Counts the host reads of tensor values made during training steps (from the start of
    one training batch to the start of the next: the step, its logging and progress bar, its
    callbacks), and logs them per line of code at the end of training.

    ``per_step`` (reads of each step) and ``counts`` (reads by line) are kept for tests and
    scripts. Counting slows the step (every torch call goes through a Python hook): a
    diagnostic, not for timed runs.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.per_step: list[int] = []
        self._counter: SyncCounter | None = None

    @property
    def steps(self) -> int:
        """Training steps counted so far."""
        return len(self.per_step)

    def _stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.per_step.append(sum(self._counter.counts.values()))
            self.counts.update(self._counter.counts)
            self._counter = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._stop()
        self._counter = SyncCounter(pl_module.device.type != "cpu").__enter__()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()  # validation reads its scores once; not a per-step cost

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        if not self.steps:
            return
        lines = [f"{n / self.steps:8.2f}  {where}" for where, n in self.counts.most_common()]
        log.info("host reads of tensor values per training step (%d steps):\n%s", self.steps,
                 "\n".join(lines) or "    none")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._stop()
