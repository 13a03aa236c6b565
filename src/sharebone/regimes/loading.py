"""Rebuild the regime a checkpoint was trained with, by its registered name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sharebone.checkpoint_io import CheckpointError, describe_backbone, read_checkpoint
from sharebone.regimes.base import REGIMES, FewShotRegime, create_regime


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
    model = create_regime(meta["regime"], **hparams)
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
