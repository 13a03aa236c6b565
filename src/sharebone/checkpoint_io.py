"""Checkpoint files: finding and reading them safely, writing them so that a kill never
leaves half a file, and picking up a run where it stopped. Rebuilding a regime from a
checkpoint is :func:`sharebone.regimes.loading.load_regime`.

- :func:`read_checkpoint`: ``weights_only=True`` always (a checkpoint is data), and only
  files sharebone wrote.
- :class:`AtomicCheckpointIO`: a checkpoint is written to a temporary file next to it and
  renamed over the target (``os.replace``, atomic on POSIX), so a process killed while saving
  leaves either the previous complete file or the new complete file, never a truncated one.
- :func:`resume_checkpoint`: ``resume=<run dir or .ckpt>`` -> the file to continue from
  (a run directory's ``last.ckpt``: the most recent state, not the best-scoring one).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from sharebone.errors import ShareboneError, refused_pickle
from sharebone.files import DiskFullError, atomic_write


class CheckpointError(ShareboneError, RuntimeError):
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
        if len(found) > 1:  # a folder of runs: picking one by name order would be a guess
            listed = "\n  ".join(str(p) for p in found[:10])
            more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
            raise CheckpointError(f"{path} holds {len(found)} checkpoints in other folders than "
                                  f"a run's checkpoints/; pass one of them:\n  {listed}{more}")
        return found[0]
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass ckpt=<file.ckpt> or a run "
                              "directory (outputs/<date>/<time>).")
    return path


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/last.ckpt`` -> ``<run>``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
        else checkpoint.parent


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/unsafe files
        refused = refused_pickle(err)
        if refused is not None:  # not torch's advice to load it with weights_only=False
            raise CheckpointError(f"Could not read checkpoint {path}: {refused}") from None
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            raise CheckpointError(f"Could not read checkpoint {path}: it is not a zip archive, "
                                  "as torch.save writes (truncated, corrupt, or another kind of "
                                  "file). Point at a .ckpt written by sharebone-train.") from None
        raise CheckpointError(f"Could not read checkpoint {path}: {err}. Is it a complete file "
                              "written by sharebone-train?") from err
    if not isinstance(checkpoint, dict) or "sharebone" not in checkpoint:
        raise CheckpointError(f"{path} is not a sharebone checkpoint (no 'sharebone' metadata). "
                              "Evaluate checkpoints written by sharebone-train.")
    return checkpoint


def describe_backbone(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`sharebone.files.atomic_write`: a temporary file in the
    target's folder, fsync, then ``os.replace``.

    Lightning 2.6's default serialises the whole checkpoint into memory, writes it to a
    temporary file in the *system* temp folder and moves it over the target. When that
    folder is on another filesystem than the run (``/tmp`` on tmpfs, runs on a disk or NFS),
    the move is a copy, and a kill during the copy leaves a truncated ``.ckpt``; nothing is
    fsynced either. Here the temporary file sits next to the target, so the rename is atomic,
    and the checkpoint streams to disk without a second copy in memory. Remote paths
    (``s3://`` and the like) are written by the default implementation.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options, got "
                            f"{storage_options!r}.")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        try:
            with atomic_write(target) as f:
                torch.save(checkpoint, f)
        except DiskFullError as err:
            raise DiskFullError(f"Checkpoint not saved: {err} {_continue_from(target)}") from err
        return None

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Always ``weights_only=True``: a checkpoint is data, and resuming one must never run
        its pickle, whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks for (an
        explicit ``True`` is the one thing that variable does not override)."""
        if weights_only is False:
            raise CheckpointError(f"Refusing to load {path} with weights_only=False: sharebone "
                                  "checkpoints hold tensors and plain values only.")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as err:
            refused = refused_pickle(err)
            if refused is None:
                raise
            raise CheckpointError(f"Refusing checkpoint {path}: {refused}") from None


def _continue_from(target: Path) -> str:
    """How to go on after a checkpoint that could not be written: what is there, resume=."""
    saved = sorted(p.name for p in target.parent.glob("*.ckpt"))
    if not saved:
        return "No checkpoint was saved before it; free space and start the run again."
    return (f"Saved before, complete: {', '.join(saved)}. Once there is space, continue the "
            f"run from its last checkpoint: sharebone-train resume={run_dir_of(target)}")


def resume_checkpoint(resume: str | Path | None) -> str | None:
    """The checkpoint ``resume=`` names: a ``.ckpt`` as is; a run dir's ``last.ckpt``.

    A run directory is resolved to ``checkpoints/last.ckpt`` (the latest state, written every
    ``checkpoint.every_n_train_steps`` steps and at each epoch end), else to whatever
    :func:`find_checkpoint` finds there.
    """
    if resume in (None, ""):
        return None
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
    try:
        path = find_checkpoint(path)
        read_checkpoint(path)  # weights_only=True, sharebone's own: refused here, not mid-fit
    except CheckpointError as err:
        raise CheckpointError(f"Cannot resume: {err}") from err
    return str(path)


def record_hparams(path: str | Path, hparams: dict[str, Any], note: dict[str, Any]) -> None:
    """Rewrite checkpoint ``path`` (atomically) with ``hparams`` as its hyperparameters, both
    Lightning's and sharebone's record of them, and ``note`` under ``sharebone``: how a
    setting chosen after training (``auto``, on validation) reaches ``sharebone-eval``."""
    checkpoint = read_checkpoint(path)
    checkpoint["sharebone"]["hparams"] = dict(hparams)
    checkpoint["sharebone"].update(note)
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = dict(hparams)
    with atomic_write(find_checkpoint(path)) as f:
        torch.save(checkpoint, f)
