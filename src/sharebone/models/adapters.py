"""Parameter-efficient task-specific modules on a backbone: FiLM, residual adapters, LoRA.

:func:`inject_adapters` adds them in place and returns the names of the parameters it added,
which are ordinary parameters of the backbone (``named_parameters``, ``state_dict``,
:func:`torch.func.functional_call`), so that a sharing map can select them by name:

- ``film`` (FiLM, Perez et al., AAAI 2018, arXiv:1709.07871; per channel after every norm
  layer, as CNAPs, Requeima et al., NeurIPS 2019, arXiv:1906.07697): ``<norm>.film_gamma``
  and ``<norm>.film_beta``, the norm's output ``y`` becoming ``film_gamma * y + film_beta``;
  initialised to 1 and 0.
- ``residual`` (residual adapters, Rebuffi, Bilen & Vedaldi, NeurIPS 2017, arXiv:1705.08045;
  the task-specific adapters of TSA, Li, Liu & Bilen, CVPR 2022, arXiv:2107.00358):
  ``<conv>.residual_adapter``, a 1x1 conv beside every 3x3 conv (groups 1), the output being
  ``conv(x) + adapter(x)``; initialised to 0.
- ``lora`` (LoRA, Hu et al., ICLR 2022, arXiv:2106.09685): ``<layer>.lora_A`` and
  ``<layer>.lora_B`` on every ``nn.Linear`` and ``nn.Conv2d``, the weight used being
  ``W + (lora_B @ lora_A) * alpha / rank`` (for a conv, ``lora_A`` maps
  ``in_channels / groups * k * k`` to ``rank`` and ``lora_B`` ``rank`` to ``out_channels``);
  ``lora_A`` as a linear layer's weight (Kaiming-uniform), ``lora_B`` 0.

Every kind starts as the identity: right after injection the backbone computes exactly what it
did. The original parameters keep their names (a layer gains parameters, it is not wrapped):
an adapted module is the same module with its class swapped for a subclass
(``FiLMBatchNorm2d``, ``ResidualAdapterConv2d``, ``LoRAConv2d``...), so a checkpoint of the
plain backbone loads into an adapted one with ``strict=False``, missing only the added names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sharebone.adaptation import TransductiveBatchNorm
from sharebone.errors import SettingError

__all__ = ["ADAPTER_KINDS", "FiLM", "LoRA", "ResidualAdapter", "add_film", "add_lora",
           "add_residual_adapters", "adapter_parameter_names", "inject_adapters"]

#: The config key the sharing map reads; errors name it (and its sub-keys).
KEY = "sharing.adapters"


class Adapted:
    """Mixin of every adapted module's class; :attr:`adapter_names` are its added parameters."""

    adapter_names: tuple[str, ...] = ()


class FiLM(Adapted):
    """A norm layer followed by FiLM: ``film_gamma * norm(x) + film_beta``, per channel
    (``film_channel_dim``: 1 for batch and group norms, -1 for a channels-last layer norm,
    whose ``film_gamma`` has the norm's ``normalized_shape``)."""

    adapter_names = ("film_gamma", "film_beta")
    film_channel_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # type: ignore[misc]
        gamma, beta = self.film_gamma, self.film_beta
        if self.film_channel_dim == 1:
            shape = (1, -1) + (1,) * (y.dim() - 2)
            gamma, beta = gamma.view(shape), beta.view(shape)
        return y * gamma + beta


class ResidualAdapter(Adapted):
    """A conv plus a parallel 1x1 conv (``residual_adapter [out, in, 1, 1]``) of the same
    stride, padded so that both outputs have the same shape."""

    adapter_names = ("residual_adapter",)
    adapter_padding: int | tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # type: ignore[misc]
        return out + F.conv2d(x, self.residual_adapter, stride=self.stride,
                              padding=self.adapter_padding)


class LoRA(Adapted):
    """A linear or conv layer whose weight is ``weight + (lora_B @ lora_A) * lora_scaling``."""

    adapter_names = ("lora_A", "lora_B")
    lora_scaling: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).view(self.weight.shape) * self.lora_scaling
        weight = self.weight + delta
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, weight, self.bias)
        return F.linear(x, weight, self.bias)


_CLASSES: dict[tuple[type, type], type] = {}


def adapted_class(mixin: type, base: type) -> type:
    """The subclass of ``base`` with ``mixin`` (one per pair, named e.g. ``FiLMBatchNorm2d``
    and kept as a global of this module, so ``copy.deepcopy`` and pickling in the same process
    find it)."""
    if (mixin, base) not in _CLASSES:
        name = mixin.__name__ + base.__name__
        if name in globals():
            name += "_" + base.__module__.replace(".", "_")
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _CLASSES[(mixin, base)] = cls
    return _CLASSES[(mixin, base)]


def _adapt(module: nn.Module, mixin: type, parameters: dict[str, torch.Tensor]) -> None:
    module.__class__ = adapted_class(mixin, type(module))
    for name, value in parameters.items():
        module.register_parameter(name, nn.Parameter(value))


def _inject(backbone: nn.Module, kind: str, serves: Callable[[nn.Module], bool],
            adapt: Callable[[nn.Module], None], looked_for: str) -> list[str]:
    """Adapt every module of ``backbone`` that ``serves`` accepts; the added names."""
    targets = [(name, m) for name, m in backbone.named_modules() if serves(m)]
    taken = [name or "(the backbone)" for name, m in targets if isinstance(m, Adapted)]
    if taken:
        raise SettingError(
            f"{KEY}: {kind!r} would adapt {', '.join(taken[:3])}, which already carry an "
            "adapter; inject each kind once, and not two kinds on the same layers.")
    if not targets:
        raise SettingError(
            f"{KEY}: {kind!r} found no module to adapt in this {type(backbone).__name__}: it "
            f"looks for {looked_for}. Choose another kind ({', '.join(ADAPTER_KINDS)}) or a "
            "backbone that has them" + (" (an mlp gets norm layers with "
                                        "backbone.batch_norm=true)." if kind == "film" else "."))
    added = []
    for name, module in targets:
        adapt(module)
        added += [f"{name}.{p}" if name else p for p in type(module).adapter_names]
    return added


# ------------------------------------------------------------------------------------- FiLM

FILM_NORMS = "BatchNorm1d/2d/3d, LayerNorm, GroupNorm"


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm):  # not a batch norm fused with more (BatchNormAct2d)
        return type(module).forward is _BatchNorm.forward or isinstance(module, FiLM)
    return isinstance(module, nn.LayerNorm | nn.GroupNorm | TransductiveBatchNorm)


def _add_film(module: nn.Module) -> None:
    like = next((p for p in module.parameters(recurse=False)), None)
    options = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if isinstance(module, nn.LayerNorm):
        # timm's LayerNorm2d normalises the channels of an [N, C, H, W] input.
        channels_first = type(module).__name__.endswith("2d")
        shape = (module.normalized_shape[0],) if channels_first else module.normalized_shape
        dim = 1 if channels_first else -1
    else:
        shape = (module.num_channels if isinstance(module, nn.GroupNorm)
                 else module.num_features,)
        dim = 1
    _adapt(module, FiLM, {"film_gamma": torch.ones(shape, **options),
                          "film_beta": torch.zeros(shape, **options)})
    module.film_channel_dim = dim


def add_film(backbone: nn.Module) -> list[str]:
    """FiLM after every norm layer of ``backbone`` (in place); the parameter names added,
    ``<norm>.film_gamma`` and ``<norm>.film_beta``, initialised to 1 and 0."""
    return _inject(backbone, "film", _is_norm, _add_film, FILM_NORMS)


# --------------------------------------------------------------------------- residual adapters

RESIDUAL_CONVS = "nn.Conv2d with a 3x3 kernel, groups=1 and 'same'-style padding"


def _adapter_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The padding that gives a 1x1 conv of ``conv``'s stride ``conv``'s output shape, or
    None when none does."""
    if conv.padding == "same":
        return (0, 0) if all(s == 1 for s in conv.stride) else None
    if isinstance(conv.padding, str):  # 'valid'
        return None
    pads = []
    for pad, dilation, kernel in zip(conv.padding, conv.dilation, conv.kernel_size,
                                     strict=True):
        extra = pad - dilation * (kernel - 1) // 2
        if extra < 0 or dilation * (kernel - 1) % 2:
            return None
        pads.append(extra)
    return (pads[0], pads[1])


def _serves_residual(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)
            and module.groups == 1 and _adapter_padding(module) is not None)


def _add_residual(conv: nn.Module) -> None:
    padding = _adapter_padding(conv)
    weight = conv.weight
    _adapt(conv, ResidualAdapter, {"residual_adapter": torch.zeros(
        conv.out_channels, conv.in_channels, 1, 1, device=weight.device, dtype=weight.dtype)})
    conv.adapter_padding = padding


def add_residual_adapters(backbone: nn.Module) -> list[str]:
    """A zero-initialised parallel 1x1 conv beside every 3x3 conv of ``backbone`` (in place);
    the parameter names added, ``<conv>.residual_adapter``."""
    return _inject(backbone, "residual", _serves_residual, _add_residual, RESIDUAL_CONVS)


# ------------------------------------------------------------------------------------- LoRA

LORA_LAYERS = "nn.Linear, nn.Conv2d (their own forward, not a subclass's)"


def _serves_lora(module: nn.Module) -> bool:
    if isinstance(module, Adapted) and isinstance(module, nn.Linear | nn.Conv2d):
        return True  # adapted already: refused, not skipped
    return ((isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward)
            or (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward))


def add_lora(backbone: nn.Module, rank: int = 4, alpha: float | None = None) -> list[str]:
    """LoRA on every ``nn.Linear`` and ``nn.Conv2d`` of ``backbone`` (in place): the parameter
    names added, ``<layer>.lora_A [rank, fan_in]`` and ``<layer>.lora_B [out, rank]``; the
    update is scaled by ``alpha / rank`` (``alpha`` defaults to ``rank``: a scale of 1)."""
    rank = check_rank(rank)
    alpha = float(rank) if alpha is None else check_alpha(alpha)

    def add(layer: nn.Module) -> None:
        weight = layer.weight
        fan_in = weight[0].numel()  # in_features, or in_channels / groups * k * k
        a = torch.empty(rank, fan_in, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        _adapt(layer, LoRA, {"lora_A": a, "lora_B": torch.zeros(
            weight.shape[0], rank, device=weight.device, dtype=weight.dtype)})
        layer.lora_scaling = alpha / rank

    return _inject(backbone, "lora", _serves_lora, add, LORA_LAYERS)


def check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SettingError(f"{KEY}.rank must be an integer >= 1 (LoRA's rank r), got {rank!r}; "
                           "4 or 8 are usual.")
    return rank


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise SettingError(f"{KEY}.alpha must be a positive number (LoRA scales its update by "
                           f"alpha / rank), got {alpha!r}; leave it unset for alpha = rank.")
    return float(alpha)


# -------------------------------------------------------------------------------- entry point

#: kind -> (injector, the options it takes).
ADAPTER_KINDS: dict[str, tuple[Callable[..., list[str]], tuple[str, ...]]] = {
    "film": (add_film, ()),
    "residual": (add_residual_adapters, ()),
    "lora": (add_lora, ("rank", "alpha")),
}


def inject_adapters(backbone: nn.Module, kind: str, **options: Any) -> list[str]:
    """Add ``kind``'s task-specific modules to ``backbone`` in place (``film``, ``residual``,
    ``lora``; options: ``rank``, ``alpha`` for ``lora``); the names of the parameters added,
    in module order. The backbone computes the same function right after.

    Example:
        >>> from sharebone.models.backbones import conv4
        >>> inject_adapters(conv4(hidden=4, image_size=16), "film")[:2]
        ['blocks.0.1.film_gamma', 'blocks.0.1.film_beta']
    """
    check_options(kind, options)
    return ADAPTER_KINDS[kind][0](backbone, **options)


def check_options(kind: str, options: dict[str, Any]) -> None:
    """Refuse an unknown ``kind`` or an option it does not take, naming the key."""
    if kind not in ADAPTER_KINDS:
        raise SettingError(f"{KEY}.kind must be one of {', '.join(ADAPTER_KINDS)}, got "
                           f"{kind!r}.")
    accepted = ADAPTER_KINDS[kind][1]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no options"
        raise SettingError(f"{KEY}.{unknown[0]} does not apply to kind {kind!r} ({kind} "
                           f"{takes}); remove it.")
    if "rank" in options:
        check_rank(options["rank"])
    if "alpha" in options:
        check_alpha(options["alpha"])


def adapter_parameter_names(backbone: nn.Module) -> list[str]:
    """The names of every adapter parameter in ``backbone``, in module order."""
    return [f"{name}.{p}" if name else p for name, m in backbone.named_modules()
            if isinstance(m, Adapted) for p in type(m).adapter_names]
