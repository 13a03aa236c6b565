"""A task's images as a backbone takes them: grey <-> RGB and a resize, the one stated
conversion used wherever images of one domain meet a model of another (``sharebone-eval
convert=auto``, many sources in one run)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sharebone.errors import SettingError

__all__ = ["LUMA", "InputConversion", "conversion_between", "convert_uint8"]

#: ITU-R BT.601 luma: RGB -> one grey channel, as Pillow's ``convert("L")`` weighs them.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputConversion:
    """A task's float images as a checkpoint takes them: grey <-> RGB (grey repeated into
    three channels; RGB to BT.601 luma), then a bilinear (antialiased) resize to the trained
    size. Applied to the model's input as the task prepares it (its normalisation included),
    on the device, to support and query alike."""

    channels: tuple[int, int] | None = None  # (task's, checkpoint's)
    size: tuple[int, int] | None = None

    def __bool__(self) -> bool:
        return self.channels is not None or self.size is not None

    def describe(self) -> str:
        parts = []
        if self.channels:
            a, b = self.channels
            parts.append("RGB -> grey (BT.601 luma)" if (a, b) == (3, 1)
                         else "grey -> RGB (repeated)")
        if self.size:
            parts.append(f"{self.size[0]} px -> {self.size[1]} px (bilinear, antialiased)")
        return ", ".join(parts) or "none"

    def images(self, x: torch.Tensor) -> torch.Tensor:
        lead, y = x.shape[:-3], x.reshape(-1, *x.shape[-3:])
        if self.channels == (3, 1):
            y = (y * y.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.size is not None and y.shape[0]:
            side = self.size[1]
            y = F.interpolate(y, size=(side, side), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.channels == (1, 3):
            y = y.expand(-1, 3, -1, -1).contiguous()
        return y.reshape(*lead, *y.shape[1:])

    def __call__(self, batch: Any) -> Any:
        return dataclasses.replace(batch, support=self.images(batch.support),
                                   query=self.images(batch.query))



def conversion_between(channels: int, size: int | None, to_channels: int | None,
                       to_size: int | None, key: str) -> InputConversion:
    """The conversion from ``channels``/``size`` images to ``to_channels``/``to_size`` ones
    (None: keep); refused, naming ``key``, where none is stated (other than grey <-> RGB)."""
    pair = None
    if to_channels is not None and int(channels) != int(to_channels):
        pair = (int(channels), int(to_channels))
        if pair not in ((1, 3), (3, 1)):
            raise SettingError(f"{key}={channels}: these images cannot be converted to "
                               f"{to_channels} channels (grey <-> RGB only). Fix: a source of "
                               f"1- or 3-channel images, or a backbone of {channels} channels.")
    resize = None
    if size is not None and to_size is not None and int(size) != int(to_size):
        resize = (int(size), int(to_size))
    return InputConversion(pair, resize)


def convert_uint8(images: torch.Tensor, conversion: InputConversion,
                  chunk: int = 4096) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` images converted (as floats in ``[0, 1]``, chunk by chunk, so a
    large split never exists as floats whole) back to uint8."""
    if not conversion:
        return images
    parts = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].float().div_(255)
        parts.append(conversion.images(x).mul_(255).round_().clamp_(0, 255).to(torch.uint8))
    if not parts:
        side = conversion.size[1] if conversion.size else images.shape[-1]
        channels = conversion.channels[1] if conversion.channels else images.shape[1]
        return images.new_zeros((0, channels, side, side))
    return torch.cat(parts)
