"""Killing this process's W&B service (``wandb-core``) for real, from a test or a run; reading
a run's records back with ``wandb leet inspect``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

WANDB = Path(sys.executable).parent / "wandb"


def leet_inspect(run_dir: Path, *args: str) -> str:
    """``wandb leet inspect <args> <run_dir>``: the run's own records, read back."""
    exe = str(WANDB) if WANDB.exists() else shutil.which("wandb")
    return subprocess.run([exe, "leet", "inspect", *args, str(run_dir)], check=True,
                          capture_output=True, text=True, timeout=120).stdout


def _state(pid: int) -> tuple[int, str] | None:
    """``(parent pid, state letter)`` of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def wandb_service_pids() -> list[int]:
    """The live ``wandb-core`` processes this process started (its W&B service)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        state = _state(int(entry.name))
        if state is None or state[0] != me or state[1] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"wandb-core" in cmdline:
            found.append(int(entry.name))
    return found


def kill_wandb_service() -> list[int]:
    """SIGKILL this process's W&B service; returns once it is dead (a zombie or gone)."""
    pids = wandb_service_pids()
    assert pids, "no wandb-core child process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any((s := _state(pid)) is not None and s[1] != "Z" for pid in pids):
        assert time.monotonic() < deadline, "wandb-core survived SIGKILL"
        time.sleep(0.02)
    time.sleep(0.2)  # let the client's reader see the connection reset
    return pids


class KillWandbService(pl.Callback):
    """Kills the W&B service after optimizer step ``step``, or at the end of training
    (``step=null``), and notes it in ``marker`` (a file) when given."""

    def __init__(self, step: int | None = None, marker: str | None = None) -> None:
        self.step, self.marker = step, marker
        self.killed: list[int] = []

    def _kill(self, trainer: pl.Trainer) -> None:
        if not self.killed:
            self.killed = kill_wandb_service()
            if self.marker:
                Path(self.marker).write_text(str(trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._kill(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.step is None:
            self._kill(trainer)


def stop_wandb_service() -> list[int]:
    """SIGSTOP this process's W&B service: alive, but it answers nothing (as frozen by a
    debugger, a cgroup or job control). Returns the pids, for :func:`kill_stopped`."""
    pids = wandb_service_pids()
    assert pids, ("no wandb-core child process to stop (did wandb.init run past "
                  "logger.wandb.timeout and fall back to CSV?)")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while any((s := _state(pid)) is not None and s[1] not in "TtZ" for pid in pids):
        assert time.monotonic() < deadline, "wandb-core did not stop"
        time.sleep(0.02)
    return pids


def kill_stopped(pids: list[int]) -> None:
    """A test's cleanup: SIGKILL the services it stopped, should the code under test not have
    ended them (a stopped process would otherwise stay for good)."""
    for pid in pids:
        state = _state(pid)
        if state is not None and state[1] != "Z":
            os.kill(pid, signal.SIGKILL)


def wandb_cores_of(pid: int) -> list[int]:
    """The ``wandb-core`` processes started by process ``pid`` (``--pid <pid>`` on their
    command line), for a test to clean up after a child process it ran."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"wandb-core" in a for a in args[:1]) and f"{pid}".encode() in args:
            found.append(int(entry.name))
    return found


class StopWandbService(pl.Callback):
    """SIGSTOPs the W&B service after optimizer step ``step``; the pids are in ``stopped``."""

    def __init__(self, step: int = 1) -> None:
        self.step = step
        self.stopped: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.stopped:
            self.stopped = stop_wandb_service()
