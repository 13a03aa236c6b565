"""Writing files so that a crash, a kill or an error never leaves a half-written one.

:func:`atomic_write` is the one way sharebone writes a file it must not lose: downloads,
decoded-data caches, checkpoints, result tables.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sharebone.errors import SettingError, ShareboneError

#: Temporary files are ``.<name>.<random>.tmp``: hidden, and never ending in the target's own
#: suffix, so no search for ``*.ckpt``, ``*.zip`` or ``*.pt`` can mistake a half-written file
#: for a finished one.
TMP_SUFFIX = ".tmp"
#: A temporary file from before its owner was recorded in its name (``.<name>.<8
#: characters>.tmp``) is removed once it has not been written to for this long.
LEGACY_TMP_STALE_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _owner_tag() -> str:
    """``<host>-<pid>``: who writes a temporary file, so that a later write can tell a dead
    writer's leftover (killed with ``kill -9``, the machine lost) from a live one's."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(path: Path, middle: str) -> bool:
    """Whether the temporary file ``.<name>.<middle>.tmp`` is a dead writer's: written on
    this host by a process that no longer exists, or (no owner recorded) untouched for
    :data:`LEGACY_TMP_STALE_SECONDS`. A live writer's, or another host's, is never stale."""
    owner = re.fullmatch(r"(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+", middle)
    if owner is not None:
        return owner["host"] == _host() and not _alive(int(owner["pid"]))
    if re.fullmatch(r"[a-z0-9_]{8}", middle):
        try:
            return time.time() - path.lstat().st_mtime > LEGACY_TMP_STALE_SECONDS
        except OSError:
            return False
    return False  # not a name atomic_write gives: not ours


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writers of ``target`` killed mid-write left beside it
    (a miniImageNet cache's is 1.3 GB); returns what was removed. Only regular files named
    as :func:`atomic_write` names them, and only a dead writer's (see :func:`_stale`)."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        middle = name[len(prefix):-len(TMP_SUFFIX)]
        path = Path(entry.path)
        if entry.is_file(follow_symlinks=False) and _stale(path, middle):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


#: What a write to a full disk (or past a quota) fails with.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(ShareboneError, OSError):
    """A file could not be written for want of space; the message names it and says that
    nothing was half-written (callers add how to go on: ``resume=``, ``output_dir=``)."""


def full_disk_error(err: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk in ``err``'s chain, else None: torch's
    ``enforce fail at inline_container.cc`` hides the ``ENOSPC`` it met in its context."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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
    remove_stale_temporaries(target)
    text = {} if mode == "wb" else {"encoding": encoding or "utf-8"}
    fd, tmp = _temp_file(target)
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = full_disk_error(err)
        if full is None:
            raise
        raise DiskFullError(f"No space left on the device to write {target} ({full.strerror}): "
                            f"it was not written, nothing half-written is left and the files "
                            f"written before are complete. Free space in {target.parent}."
                            ) from err
    fsync_dir(target.parent)


def _temp_file(target: Path) -> tuple[int, str]:
    """A new hidden temporary file next to ``target``: its descriptor and path (created 0600
    by ``mkstemp``, given the mode ``open()`` would give)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{_owner_tag()}.",
                               suffix=TMP_SUFFIX)
    try:
        chmod_like_open(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp
