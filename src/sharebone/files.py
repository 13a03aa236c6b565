"""Writing files so that a crash, a kill or an error never leaves a half-written one.

:func:`atomic_write` is the one way sharebone writes a file it must not lose: downloads,
decoded-data caches, checkpoints, result tables.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sharebone.errors import SettingError

#: Temporary files are ``.<name>.<random>.tmp``: hidden, and never ending in the target's own
#: suffix, so no search for ``*.ckpt``, ``*.zip`` or ``*.pt`` can mistake a half-written file
#: for a finished one.
TMP_SUFFIX = ".tmp"


def chmod_like_open(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode ``open()`` would have given it,
    so files written atomically are as readable as any other file the run writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb",
                 encoding: str | None = None) -> Iterator[IO[Any]]:
    """Write ``path`` all at once or not at all.

    Yields a file open on a temporary file next to ``path`` (same folder, so the final rename
    is atomic; named ``.<name>.<random>.tmp``, see :data:`TMP_SUFFIX`), created with the mode
    ``open()`` would give. When the block completes, the file is flushed and fsynced, moved
    onto ``path`` with ``os.replace`` and the folder is fsynced. If the block raises anything
    (``KeyboardInterrupt`` included), the temporary file is removed and ``path`` is left as it
    was. The parent folder is created if needed.

    Args:
        path: the file to write.
        mode: ``"wb"`` (default) or ``"w"`` (text, ``encoding`` default UTF-8).

    Example::

        with atomic_write(run_dir / "results.json", "w") as f:
            json.dump(results, f)
    """
    if mode not in ("w", "wb"):
        raise SettingError(f"atomic_write writes a whole new file: mode 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    text = {} if mode == "wb" else {"encoding": encoding or "utf-8"}
    try:
        with os.fdopen(fd, mode, **text) as f:
            chmod_like_open(f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
