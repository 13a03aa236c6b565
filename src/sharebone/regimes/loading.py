"""Rebuild the regime a checkpoint was trained with, by its registered name."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from sharebone.checkpoint_io import CheckpointError, describe_backbone, read_checkpoint
from sharebone.models import BackboneArg, is_module_record
from sharebone.models.backbones import backbone_differences, skip_pretrained_weights
from sharebone.regimes.base import REGIMES, FewShotRegime, create_regime


def load_regime(path: str | Path, backbone: BackboneArg | None = None) -> FewShotRegime:
    """Rebuild the regime a checkpoint was trained with and load its weights.

    Args:
        path: a ``.ckpt`` file or a run directory.
        backbone: the backbone spec the caller expects; when given it must match the
            checkpoint's (a conv4 checkpoint cannot be read into an MLP). Or a module: the
            regime is built on it and the checkpoint's weights loaded into it, which is how a
            regime trained on a module of one's own comes back (its checkpoint records the
            module's class, not how to build it).
    """
    checkpoint = read_checkpoint(path)
    meta = checkpoint["sharebone"]
    hparams = dict(meta["hparams"])
    trained = dict(hparams.get("backbone", {}))
    if isinstance(backbone, nn.Module):
        hparams["backbone"] = backbone
    elif is_module_record(trained):
        raise CheckpointError(
            f"Checkpoint {path} was trained with a backbone given as a module "
            f"({trained['module']}), which a checkpoint cannot rebuild. Build one again and pass "
            f"it: load_regime(path, backbone={trained['module'].rpartition('.')[2]}(...)); the "
            "checkpoint's weights are loaded into it.")
    elif backbone is not None and backbone_differences(dict(backbone), trained):
        raise CheckpointError(
            f"Checkpoint {path} was trained with backbone ({describe_backbone(trained)}) but "
            f"({describe_backbone(dict(backbone))}) was requested. Drop the backbone override to "
            "use the checkpoint's own, or pass a checkpoint trained with that backbone."
        )
    if meta["regime"] not in REGIMES:
        raise CheckpointError(f"Checkpoint {path} is of regime '{meta['regime']}', which this "
                              f"sharebone does not know (known: {', '.join(REGIMES.names())}).")
    try:
        with skip_pretrained_weights():  # the checkpoint's weights replace them
            model = create_regime(meta["regime"], **hparams)
    except TypeError as err:  # hparams this version's regime does not take
        raise CheckpointError(f"Checkpoint {path} records settings a {meta['regime']} model "
                              f"does not take ({err}). Was it written by another version of "
                              "sharebone, or edited?") from err
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        given = (f"the {type(backbone).__name__} given as its backbone"
                 if isinstance(backbone, nn.Module) else f"backbone ({describe_backbone(trained)})")
        raise CheckpointError(
            f"The weights in {path} do not fit a {meta['regime']} model with {given}: "
            f"{str(err).splitlines()[0]} Was the file written by another version or edited, or "
            "the module built with other settings than the one trained?"
        ) from err
    model.run_config = meta.get("config")
    model.wandb_run_id = meta.get("wandb_run_id")  # the W&B run that trained it, if any
    return model
