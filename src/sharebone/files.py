"""Small file helpers shared by the atomic writers."""

from __future__ import annotations

import os


def chmod_like_open(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode ``open()`` would have given it,
    so files written atomically are as readable as any other file the run writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
