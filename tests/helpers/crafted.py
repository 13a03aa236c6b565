"""Hostile files: checkpoints that try to run code when they are loaded."""

from __future__ import annotations

from pathlib import Path

import torch


class OpensAFile:
    """Unpickling this calls ``open(path, "a")``: a file appearing means the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "a"))


def pickle_bomb(path: Path, victim: Path, base: dict | None = None) -> Path:
    """A checkpoint at ``path`` (a copy of ``base`` if given) carrying :class:`OpensAFile`."""
    checkpoint = dict(base or {"sharebone": {"regime": "protonet", "hparams": {}}})
    checkpoint["payload"] = OpensAFile(victim)
    torch.save(checkpoint, path)
    return path
