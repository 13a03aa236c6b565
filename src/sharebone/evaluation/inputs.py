"""Does a task's input fit a checkpoint? Checked before scoring, so that an Omniglot
checkpoint (1 channel, 28 px) given a 3-channel 84 px task is refused by its keys, with the
checkpoint's values, rather than by torch's ``expected input[15, 3, 84, 84] to have 1
channels`` half-way through.

Channels must match (every backbone's first layer is built for its channels). Another image
size is refused only where it cannot work: an MLP flattens a fixed number of pixels; a conv
net that flattens (conv4) changes its feature width with the size, which a learned head cannot
take but ProtoNet's distances can; a pooled backbone (ResNet-12) takes any size. The first is
decided from the backbone spec; the others by one episode of zeros at the task's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sharebone.data.convert import InputConversion
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError


class InputMismatchError(SettingError):
    """The task's images cannot go into the checkpoint's backbone; the message says which key."""


def trained_input(run_config: Mapping[str, Any] | None,
                  backbone: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """``(channels, image_size)`` the checkpoint was trained on (None where unrecorded)."""
    task = dict((run_config or {}).get("task") or {})
    spec = dict(backbone or {})
    channels = task.get("channels", spec.get("in_channels"))
    size = task.get("image_size", spec.get("image_size"))
    return (int(channels) if channels else None), (int(size) if size else None)


def check_spec(task: Mapping[str, Any], run_config: Mapping[str, Any] | None,
               backbone: Mapping[str, Any] | None, source: str) -> bool:
    """Refuse what the spec alone shows cannot work (channels; an MLP's pixel count).
    Returns whether the image size differs from the trained one (for :func:`check_model`)."""
    channels, size = task.get("channels", 1), task.get("image_size")
    if size is None:  # not an image task (sinusoid): nothing to compare
        return False
    was_channels, was_size = trained_input(run_config, backbone)
    spec = dict(backbone or {})
    trained = _trained(was_channels, was_size)
    if was_channels is not None and int(channels) != was_channels:
        raise InputMismatchError(
            f"task.channels={channels} but {source} was trained on {trained}: its backbone "
            f"({spec.get('name', 'a module')}) takes {was_channels}-channel images. Score it on "
            f"a task of {was_channels}-channel images (task.channels={was_channels}), pass a "
            f"checkpoint trained on {channels}-channel ones, or convert=auto (sharebone-eval: "
            "grey <-> RGB, resized to the trained size).")
    pixels = int(channels) * int(size) ** 2
    if spec.get("name") == "mlp" and spec.get("in_features") not in (None, pixels):
        raise InputMismatchError(
            f"task.image_size={size} (task.channels={channels}: {pixels} inputs) but {source} "
            f"was trained on {trained}: its mlp backbone flattens exactly "
            f"{spec['in_features']} inputs. Score it at task.image_size={was_size or '<trained>'}"
            ", or pass a checkpoint trained at this size.")
    return was_size is not None and int(size) != was_size


def check_model(model: Any, task: Mapping[str, Any], source: str) -> None:
    """One 2-way 1-shot episode of zeros at the task's size through ``model``: refuse, by
    ``task.image_size``, a size that its backbone and head cannot take together."""
    channels, size = int(task.get("channels", 1)), int(task["image_size"])
    was_channels, was_size = trained_input(model.run_config, _spec(model))
    images = torch.zeros(1, 2, channels, size, size, device=model.device)
    labels = torch.arange(2, device=model.device).unsqueeze(0)
    probe = Episode(support=images, support_labels=labels, query=images, query_labels=labels,
                    classes=labels.clone())
    was_training = model.training
    model.eval()
    try:
        with model.prediction_context():
            model.predict_episode(probe)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0][:160]
        raise InputMismatchError(
            f"task.image_size={size} but {source} was trained on "
            f"{_trained(was_channels, was_size)}, and its {model.regime_name} model cannot take "
            f"{size} px images ({reason}). Score it at task.image_size={was_size}, or pass a "
            "checkpoint trained at this size.") from err
    finally:
        model.train(was_training)


def check_task_input(model: Any, task: Mapping[str, Any], source: str) -> None:
    """:func:`check_spec`, then :func:`check_model` when the image size is another."""
    if check_spec(task, model.run_config, _spec(model), source):
        check_model(model, task, source)


def _spec(model: Any) -> dict[str, Any] | None:
    spec = getattr(model, "hparams", {}).get("backbone")
    return dict(spec) if isinstance(spec, Mapping) else None


def _trained(channels: int | None, size: int | None) -> str:
    shown = f"{channels}-channel" if channels else "its"
    return f"{shown} {size} px images (task.channels={channels}, task.image_size={size})" \
        if size else f"{shown} images (task.channels={channels})"


# ----------------------------------------------------------- converting a task's images

#: ``convert`` (sharebone-eval): ``none``, the task's images as they are (other channels are
#: refused); ``auto``, converted to the checkpoint's channels and size where they differ.
CONVERSIONS = ("none", "auto")
def plan_conversion(task: Mapping[str, Any], run_config: Mapping[str, Any] | None,
                    backbone: Mapping[str, Any] | None, source: str,
                    mode: str = "auto") -> InputConversion:
    """What turns ``task``'s images into the checkpoint's (``mode="auto"``); nothing for
    ``"none"``. Refused, by ``task.channels``, where no stated conversion exists."""
    if mode not in CONVERSIONS:
        raise SettingError(f"convert must be one of {', '.join(CONVERSIONS)}, got {mode!r}. "
                           "Fix: convert=auto (grey <-> RGB, resize) or convert=none.")
    size = task.get("image_size")
    if mode == "none" or size is None:
        return InputConversion()
    channels = int(task.get("channels", 1))
    was_channels, was_size = trained_input(run_config, backbone)
    pair = None
    if was_channels is not None and channels != was_channels:
        pair = (channels, was_channels)
        if pair not in ((1, 3), (3, 1)):
            raise InputMismatchError(
                f"task.channels={channels} but {source} was trained on "
                f"{_trained(was_channels, was_size)}; convert=auto turns grey into RGB and "
                f"RGB into grey only. Fix: a task of {was_channels}-channel images, or a "
                f"checkpoint trained on {channels}-channel ones.")
    resize = (int(size), was_size) if was_size is not None and int(size) != was_size else None
    return InputConversion(pair, resize)


def converted_task(task: Mapping[str, Any], conversion: InputConversion) -> dict[str, Any]:
    """``task`` as the model sees it after ``conversion`` (for :func:`check_task_input`)."""
    seen = dict(task)
    if conversion.channels:
        seen["channels"] = conversion.channels[1]
    if conversion.size:
        seen["image_size"] = conversion.size[1]
    return seen


class ConvertedSource:
    """An episode source whose prepared episodes go through an :class:`InputConversion`:
    the same episodes (``batch``), the model's input converted (``prepare``)."""

    def __init__(self, source: Any, conversion: InputConversion) -> None:
        self.source, self.conversion = source, conversion

    def batch(self, indices: Any) -> Any:
        return self.source.batch(indices)

    def prepare(self, batch: Any) -> Any:
        prepare = getattr(self.source, "prepare", None)
        return self.conversion(prepare(batch) if prepare is not None else batch.to_float())

    def __getattr__(self, name: str) -> Any:  # class names, device, ...: the source's
        if name in ("source", "conversion"):
            raise AttributeError(name)
        return getattr(self.source, name)
