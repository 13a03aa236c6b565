"""Load any checkpoint sharebone wrote, safely (``weights_only=True``) and with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sharebone.regimes.base import REGIMES, FewShotRegime


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def find_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run directory (its ``checkpoints/best.ckpt``, else ``last.ckpt``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.ckpt", path / "checkpoints" / "last.ckpt",
                          path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(path.rglob("*.ckpt"))
        if not found:
            raise CheckpointError(f"No checkpoint (*.ckpt) under {path}. Pass ckpt=<file.ckpt> "
                                  "or a run directory that sharebone-train wrote.")
        return found[-1]
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass ckpt=<file.ckpt> or a run "
                              "directory (outputs/<date>/<time>).")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/unsafe files
        raise CheckpointError(f"Could not read checkpoint {path}: {err}. Is it a complete file "
                              "written by sharebone-train?") from err
    if not isinstance(checkpoint, dict) or "sharebone" not in checkpoint:
        raise CheckpointError(f"{path} is not a sharebone checkpoint (no 'sharebone' metadata). "
                              "Evaluate checkpoints written by sharebone-train.")
    return checkpoint


def describe_backbone(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items())


def load_regime(path: str | Path, backbone: dict[str, Any] | None = None) -> FewShotRegime:
    """Rebuild the regime a checkpoint was trained with and load its weights.

    Args:
        path: a ``.ckpt`` file or a run directory.
        backbone: the backbone spec the caller expects; when given it must match the
            checkpoint's (a conv4 checkpoint cannot be read into an MLP).
    """
    checkpoint = read_checkpoint(path)
    meta = checkpoint["sharebone"]
    hparams = dict(meta["hparams"])
    trained = dict(hparams.get("backbone", {}))
    if backbone is not None and dict(backbone) != trained:
        raise CheckpointError(
            f"Checkpoint {path} was trained with backbone ({describe_backbone(trained)}) but "
            f"({describe_backbone(dict(backbone))}) was requested. Drop the backbone override to "
            "use the checkpoint's own, or pass a checkpoint trained with that backbone."
        )
    if meta["regime"] not in REGIMES:
        raise CheckpointError(f"Checkpoint {path} is of regime '{meta['regime']}', which this "
                              f"sharebone does not know (known: {', '.join(REGIMES.names())}).")
    model = REGIMES.create(meta["regime"], **hparams)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"The weights in {path} do not fit a {meta['regime']} model with backbone "
            f"({describe_backbone(trained)}): {str(err).splitlines()[0]} Was the file written by "
            "another version or edited?"
        ) from err
    model.run_config = meta.get("config")
    return model
