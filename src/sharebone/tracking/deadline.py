"""A time limit on every W&B call that can wait on the W&B service (``wandb-core``).

A dead service makes W&B calls fail at once; a service that is alive but does not answer
(stopped with SIGSTOP, frozen by a cgroup, swapped out for good) makes ``wandb.init`` and
``run.finish`` wait forever, and with them the run (before training, or after its results).
One daemon thread watches the calls in progress; when one has waited longer than its limit
(``logger.wandb.timeout`` seconds, else ``$SHAREBONE_WANDB_TIMEOUT``, else 60) it kills the
service this process started, so the waiting call fails at once as against a dead service
and :class:`sharebone.tracking.SafeWandbLogger` falls back to CSV. A service another process
started (``WANDB_SERVICE`` inherited) is not ours to kill: the watchdog warns and waits on.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sharebone.errors import SettingError

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "SHAREBONE_WANDB_TIMEOUT"


def call_timeout(option: Any = None) -> float:
    """The limit in seconds: ``option`` (``logger.wandb.timeout``), else the environment's
    :data:`TIMEOUT_ENV`, else :data:`DEFAULT_TIMEOUT_S`; refuses what is not a number > 0."""
    key, value = "logger.wandb.timeout", option
    if value is None:
        key, value = TIMEOUT_ENV, os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not seconds > 0:
        raise SettingError(f"{key}={value!r}: the seconds a W&B call may wait on its service "
                           f"must be a number > 0 (default {DEFAULT_TIMEOUT_S:g}; .inf waits "
                           "forever). Fix: logger.wandb.timeout=120.")
    return seconds


def _own_service() -> Any:
    """The ``subprocess.Popen`` of the W&B service this process started, else None."""
    setup = sys.modules.get("wandb.sdk.wandb_setup")
    singleton = getattr(setup, "_singleton", None)
    if singleton is None or getattr(singleton, "_pid", None) != os.getpid():
        return None
    proc = getattr(getattr(singleton, "_connection", None), "_proc", None)
    return getattr(proc, "_process", None)


@dataclass
class Watch:
    """One call under a limit; ``hung`` says, after it, whether the limit ran out during it."""

    what: str
    seconds: float
    deadline: float
    start_fires: int
    watchdog: _Watchdog = field(repr=False)

    @property
    def hung(self) -> TimeoutError | None:
        if self.watchdog.fires == self.start_fires:
            return None
        return TimeoutError(self.watchdog.last_reason or f"no answer within {self.seconds:g} s")


class _Watchdog:
    """The one thread that ends a W&B service on which a call has waited past its limit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict[int, Watch] = {}
        self._thread: threading.Thread | None = None
        self.fires = 0
        self.last_reason = ""

    @contextlib.contextmanager
    def limit(self, seconds: float, what: str) -> Iterator[Watch]:
        """Watch the code in the block: past ``seconds``, the service is ended."""
        watch = Watch(what, seconds, time.monotonic() + seconds, self.fires, self)
        if math.isinf(seconds):
            yield watch
            return
        with self._cond:
            self._calls[id(watch)] = watch
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sharebone-wandb-watch",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield watch
        finally:
            with self._cond:
                self._calls.pop(id(watch), None)

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [w for w in self._calls.values() if w.deadline <= now]
                if due:
                    for watch in due:
                        self._calls.pop(id(watch), None)
                    self._end_service(due[0])
                    continue
                wait = min((w.deadline for w in self._calls.values()), default=now + 3600)
                self._cond.wait(max(wait - now, 0.01))

    def _end_service(self, watch: Watch) -> None:
        proc = _own_service()
        if proc is None or proc.poll() is not None:
            warnings.warn(f"W&B has not answered {watch.what} for {watch.seconds:g} s and its "
                          "service is not this process's own (WANDB_SERVICE): sharebone cannot "
                          "end it, the run waits on it.", UserWarning, stacklevel=1)
            return
        self.last_reason = (f"the W&B service (wandb-core, pid {proc.pid}) did not answer "
                            f"{watch.what} within {watch.seconds:g} s "
                            "(logger.wandb.timeout); it was ended")
        self.fires += 1
        proc.kill()  # a stopped process dies of SIGKILL too; the waiting call then fails


WATCHDOG = _Watchdog()


def limit(seconds: float, what: str) -> contextlib.AbstractContextManager[Watch]:
    """``with limit(60, "finish") as watch: ...``; after the block, ``watch.hung``."""
    return WATCHDOG.limit(seconds, what)
