"""Residual backbones of the few-shot literature: ResNet-12 and Wide ResNet 28-10.

Both are plain modules of ``nn.Conv2d``, ``nn.BatchNorm2d`` and out-of-place activations, with
no state besides batch norm's running statistics: MAML's inner loop runs them through
:func:`torch.func.functional_call` (and :func:`torch.vmap`) like conv4, and its transductive
batch norm replaces their batch norms as it does conv4's. Their features are global-average
pooled, so ``num_features`` (640 at the default widths) does not depend on the image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sharebone.errors import SettingError
from sharebone.models.backbones import check_rate, check_size, check_sizes, register_backbone

__all__ = ["ResNet12", "WideResNet", "drop_block"]


def drop_block(x: torch.Tensor, drop_rate: float, block_size: int) -> torch.Tensor:
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018, arXiv:1810.12890) on ``x [N, C, H, W]``.

    Square blocks of ``block_size`` (clipped to the feature map) are zeroed per sample and
    channel, so that about ``drop_rate`` of the activations are dropped; the rest are scaled
    up by (all / kept). As MetaOptNet's implementation: a block's seed is its top-left corner,
    drawn where the whole block fits. Out of place, and the mask is a constant, so it composes
    with :func:`torch.func.grad` and :func:`torch.vmap` (``randomness="same"`` or
    ``"different"``).
    """
    height, width = x.shape[-2:]
    size = min(block_size, height, width)
    seeds_h, seeds_w = height - size + 1, width - size + 1
    gamma = drop_rate / size**2 * (height * width) / (seeds_h * seeds_w)
    probs = torch.full((*x.shape[:-2], seeds_h, seeds_w), min(gamma, 1.0), dtype=x.dtype,
                       device=x.device)
    seeds = torch.bernoulli(probs)
    # Output pixel (i, j) is dropped if a seed lies in [i - size + 1, i] x [j - size + 1, j].
    blocked = F.max_pool2d(F.pad(seeds, [size - 1] * 4), kernel_size=size, stride=1)
    keep = 1 - blocked
    return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """3 x [conv3x3 - batch norm - LeakyReLU(0.1)] (the last activation after the residual
    sum), a 1x1 conv - batch norm shortcut, 2x2 max-pool; then dropout or DropBlock."""

    def __init__(self, in_channels: int, out_channels: int, drop: str | None = None,
                 drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.conv2, self.bn2 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.conv3, self.bn3 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop, self.drop_rate, self.block_size = drop, drop_rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.pool(self.act(out + self.shortcut(x)))
        if not self.training or self.drop is None or self.drop_rate == 0:
            return out
        if self.drop == "block":
            return drop_block(out, self.drop_rate, self.block_size)
        return F.dropout(out, self.drop_rate, training=True)

    def extra_repr(self) -> str:
        if self.drop is None:
            return ""
        what = f"DropBlock(block_size={self.block_size})" if self.drop == "block" else "dropout"
        return f"{what}, drop_rate={self.drop_rate}"


class ResNet12(nn.Module):
    """ResNet-12 as in TADAM (Oreshkin et al., NeurIPS 2018, arXiv:1805.10123) and MetaOptNet
    (Lee et al., CVPR 2019, arXiv:1904.03758), MetaOptNet's widths 64-160-320-640.

    Four :class:`ResNet12Block` s, each halving the image (84 -> 42 -> 21 -> 10 -> 5), then a
    global average pool: 640 features, 12.4M parameters. ``drop_block=True`` adds MetaOptNet's
    regularisation: dropout after the first two blocks and DropBlock (``block_size`` 5) after
    the last two, both at ``drop_rate`` (0.1), in training mode only. MetaOptNet ramps
    DropBlock's rate up from 0 over the first 40k iterations with a counter in the module;
    here it is constant (no state that MAML's functional inner loop would have to update).
    Convolutions have no bias (batch norm follows) and He-normal initialisation.

    Example:
        >>> net = ResNet12(in_channels=3, channels=(4, 6, 8, 10), image_size=16)
        >>> net(torch.randn(2, 3, 16, 16)).shape, net.num_features
        (torch.Size([2, 10]), 10)
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 image_size: int = 84, drop_block: bool = False, drop_rate: float = 0.1,
                 block_size: int = 5) -> None:
        super().__init__()
        channels = check_sizes("channels", channels, count=4)  # ResNet-12 has 4 blocks
        in_channels, block_size = check_size("in_channels", in_channels), check_size(
            "block_size", block_size)
        if check_size("image_size", image_size) < 16:
            raise SettingError(f"backbone.image_size={image_size} is too small for ResNet-12's "
                               "4 max-pools (needs >= 16); raise task.image_size.")
        drop_rate = check_rate("drop_rate", drop_rate)
        drops = ["dropout", "dropout", "block", "block"] if drop_block else [None] * 4
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*(
            ResNet12Block(a, b, drop, drop_rate, block_size)
            for a, b, drop in zip(widths, widths[1:], drops, strict=False)))
        self.num_features = channels[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean((2, 3))


class WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3
    plus the input, through a 1x1 conv on the activated input when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), conv3x3(in_channels, out_channels,
                                                                    stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_channels), conv3x3(out_channels, out_channels)
        self.act = nn.ReLU()
        self.shortcut = (None if in_channels == out_channels and stride == 1 else
                         nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.act(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, BMVC 2016,
    arXiv:1605.07146), as the few-shot papers use WRN-28-10 (LEO, Rusu et al., ICLR 2019,
    arXiv:1807.05960; S2M2, Mangla et al., WACV 2020, arXiv:1907.12087).

    A 3x3 conv to 16 channels, three groups of ``(depth - 4) / 6`` :class:`WideBlock` s of
    widths ``16k, 32k, 64k`` (strides 1, 2, 2), batch norm and ReLU, then a global average
    pool: WRN-28-10 gives 640 features from 36.5M parameters (at 84x84 the last map is 21x21).

    Example:
        >>> net = WideResNet(depth=10, widen_factor=1)
        >>> net(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 3, depth: int = 28, widen_factor: int = 10,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if check_size("depth", depth) < 10 or (depth - 4) % 6:
            raise SettingError(f"backbone.depth: a wide ResNet's depth is 6n + 4 with n >= 1 "
                               f"(10, 16, 22, 28, ...), got {depth}.")
        widen_factor = check_size("widen_factor", widen_factor)
        in_channels, drop_rate = check_size("in_channels", in_channels), check_rate(
            "drop_rate", drop_rate)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                stride if j == 0 else 1, drop_rate) for j in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(conv3x3(in_channels, widths[0]), *groups,
                                    nn.BatchNorm2d(widths[-1]), nn.ReLU())
        self.num_features = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean((2, 3))


@register_backbone("resnet12")
def resnet12(in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
             image_size: int = 84, drop_block: bool = False, drop_rate: float = 0.1,
             block_size: int = 5) -> ResNet12:
    return ResNet12(in_channels=in_channels, channels=channels, image_size=image_size,
                    drop_block=drop_block, drop_rate=drop_rate, block_size=block_size)


@register_backbone("wrn28_10")
def wrn28_10(in_channels: int = 3, image_size: int = 84, depth: int = 28, widen_factor: int = 10,
             drop_rate: float = 0.0) -> WideResNet:
    """WRN-28-10; ``depth``/``widen_factor`` give the other wide ResNets (tests use 10/1).
    ``image_size`` is accepted for config symmetry: the pooled features do not depend on it."""
    check_size("image_size", image_size)
    return WideResNet(in_channels=in_channels, depth=depth, widen_factor=widen_factor,
                      drop_rate=drop_rate)
