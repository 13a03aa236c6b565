"""Shared backbones: ``x -> features``, with ``num_features`` telling a head its input size."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sharebone.errors import SettingError
from sharebone.registry import Registry

BACKBONES: Registry[nn.Module] = Registry(
    "backbone", hint="Any timm model is a backbone too: 'timm:<model name>' (needs timm).")
register_backbone = BACKBONES.register
#: ``create_backbone("timm:resnet18")`` is ``create_backbone("timm", model="resnet18")``.
TIMM_PREFIX = "timm:"


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. ``create_backbone("conv4", in_channels=1)``;
    ``"timm:<model>"`` builds that timm model (:mod:`sharebone.models.timm_backbone`)."""
    if name.startswith(TIMM_PREFIX):
        if "model" in kwargs:
            raise SettingError(f"Backbone {name!r} names its timm model already; drop "
                               f"model={kwargs['model']!r} or use name='timm'.")
        name, kwargs = "timm", {"model": name[len(TIMM_PREFIX):], **kwargs}
    return BACKBONES.create(name, **kwargs)


#: A backbone given to a regime: a registry spec (``{"name": "conv4", ...}``), or a module.
BackboneArg = Mapping[str, Any] | nn.Module


def build_backbone(backbone: BackboneArg) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone module and what a checkpoint records of it.

    A registry spec is built (:func:`create_backbone`) and recorded as it is, so a checkpoint
    can rebuild it. A module is used as it is (not copied) and recorded by its class
    (:func:`module_record`): a checkpoint cannot rebuild it, only load weights into one the
    user builds again (``load_regime(path, backbone=MyNet())``).

    Example:
        >>> net, record = build_backbone(nn.Sequential(nn.Flatten(), nn.Linear(4, 8)))
        >>> record
        {'module': 'torch.nn.modules.container.Sequential'}
        >>> build_backbone({"name": "mlp", "in_features": 4, "hidden": [8]})[1]
        {'name': 'mlp', 'in_features': 4, 'hidden': [8]}
    """
    if isinstance(backbone, nn.Module):
        return backbone, module_record(backbone)
    if not isinstance(backbone, Mapping) or "name" not in backbone:
        got = (f"a mapping without 'name' (keys: {sorted(map(str, backbone))})"
               if isinstance(backbone, Mapping) else f"{type(backbone).__name__}")
        raise TypeError(
            f"backbone must be an nn.Module (your own network) or a registry spec such as "
            f"{{'name': 'conv4', 'in_channels': 1}} (registered: {', '.join(BACKBONES.names())}"
            f"), got {got}.")
    spec = dict(backbone)
    return create_backbone(spec.pop("name"), **spec), dict(backbone)


def module_record(module: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of a backbone given as a module: its class's import path, and
    ``num_features`` where it has one (plain values, so the file loads with
    ``weights_only=True``)."""
    cls = type(module)
    record: dict[str, Any] = {"module": f"{cls.__module__}.{cls.__qualname__}"}
    width = getattr(module, "num_features", None)
    if isinstance(width, int) and not isinstance(width, bool):
        record["num_features"] = width
    return record


def is_module_record(spec: Mapping[str, Any] | None) -> bool:
    """``spec`` records a backbone that was given as a module (no registry name to rebuild
    it by)."""
    return isinstance(spec, Mapping) and "module" in spec and "name" not in spec


def feature_width(backbone: nn.Module) -> int:
    """The width of ``backbone``'s output features, which sizes a head: its ``num_features``
    (sharebone's and timm's backbones have one); a clear error when it has none.

    Example:
        >>> feature_width(create_backbone("mlp", in_features=4, hidden=[8]))
        8
    """
    width = getattr(backbone, "num_features", None)
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        return width
    name = type(backbone).__name__
    raise SettingError(
        f"This regime puts a head on the backbone's features, so it needs their width, and the "
        f"{name} given has no positive int `num_features` (got {width!r}). Set it on the "
        f"module, e.g. `net.num_features = 64`: the size of the last dimension of net(x), "
        f"which must be features [batch, num_features], not class scores (the regime adds "
        f"the head).")


def check_size(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a width, a depth, a side), or an error naming
    ``backbone.<key>``: torch builds a 0-wide layer without a word and fails at the first
    forward pass, far from the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(f"backbone.{key} must be an integer >= {minimum}, got {value!r}; "
                           "a layer of no width (or a negative one) cannot be built.")
    return value


def check_sizes(key: str, values: Any, count: int | None = None) -> list[int]:
    """A list of sizes (:func:`check_size` each), of ``count`` entries when given."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or (
            count is not None and len(values) != count):
        many = f"{count} widths" if count is not None else "a list of widths"
        raise SettingError(f"backbone.{key} must be {many} (integers >= 1), got {values!r}.")
    return [check_size(f"{key}[{i}]", v) for i, v in enumerate(values)]


def check_rate(key: str, value: Any) -> float:
    """A dropout probability in [0, 1), or an error naming ``backbone.<key>`` (1 drops all)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise SettingError(f"backbone.{key} is a dropout probability: it must be in [0, 1), "
                           f"got {value!r}.")
    return float(value)


_SKIP_PRETRAINED = contextvars.ContextVar("skip_pretrained_weights", default=False)


@contextlib.contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Backbones built inside do not load pretrained weights (``pretrained=True`` is kept in
    their spec): for rebuilding a model whose weights come from a checkpoint next, so that a
    checkpoint loads without the pretrained weights' cache or a network."""
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def pretrained_weights_skipped() -> bool:
    """Inside :func:`skip_pretrained_weights`."""
    return _SKIP_PRETRAINED.get()


def conv_block(in_channels: int, out_channels: int, pool: bool = True) -> nn.Sequential:
    """conv3x3 -> batch norm -> ReLU -> 2x2 max-pool, the block of the MAML/ProtoNet conv net."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The 4-layer conv net of Vinyals et al. 2016, used by MAML and ProtoNet.

    Four blocks of 64 3x3 filters, batch norm, ReLU and max-pooling; a 28x28 Omniglot image
    becomes 64 features (1x1x64), an 84x84 miniImageNet image 1600 (5x5x64). MAML's
    miniImageNet net is ``hidden=32``: 800 features (5x5x32) at 84x84.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, depth: int = 4,
                 image_size: int = 28) -> None:
        super().__init__()
        in_channels, hidden = check_size("in_channels", in_channels), check_size("hidden", hidden)
        depth, image_size = check_size("depth", depth), check_size("image_size", image_size)
        channels = [in_channels] + [hidden] * depth
        pairs = zip(channels, channels[1:], strict=False)
        self.blocks = nn.Sequential(*(conv_block(a, b) for a, b in pairs))
        side = image_size
        for _ in range(depth):
            side //= 2
        if side < 1:
            raise SettingError(f"backbone.image_size={image_size} is too small for {depth} "
                               f"pooling blocks (needs >= {2 ** depth}); raise task.image_size.")
        self.num_features = hidden * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)


class MLP(nn.Module):
    """Fully connected ReLU network; the input is flattened first (the MAML sinusoid net is
    ``MLP(in_features=1, hidden=[40, 40])``)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128, 64),
                 batch_norm: bool = False) -> None:
        super().__init__()
        hidden = check_sizes("hidden", hidden)  # [] is allowed: the flattened input
        layers: list[nn.Module] = []
        width = check_size("in_features", in_features)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            width = h
        self.layers = nn.Sequential(*layers)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


@register_backbone("conv4")
def conv4(in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> ConvNet:
    return ConvNet(in_channels=in_channels, hidden=hidden, depth=4, image_size=image_size)


@register_backbone("mlp")
def mlp(in_features: int = 784, hidden: Sequence[int] = (256, 128, 64),
        batch_norm: bool = False) -> MLP:
    return MLP(in_features=in_features, hidden=hidden, batch_norm=batch_norm)


def backbone_differences(requested: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``requested`` whose values differ from the trained backbone's, the factory's
    defaults standing in for keys the checkpoint does not record: ``{name: conv4}`` asks for
    a conv4, not for a conv4 spelled out the same way.

    The one rule for "the same backbone?": loading a checkpoint, resuming a run, fine-tuning
    from a source checkpoint. An empty dict means the same.

    Example:
        >>> backbone_differences({"name": "conv4"}, {"name": "conv4", "in_channels": 1})
        {}
        >>> backbone_differences({"name": "conv4", "hidden": 32}, {"name": "conv4"})
        {'hidden': (32, 64)}
    """
    name = trained.get("name")
    known = {}
    if name in BACKBONES:
        parameters = inspect.signature(BACKBONES.get(name)).parameters.values()
        known = {p.name: p.default for p in parameters if p.default is not p.empty}
    known.update(trained)
    return {k: (v, known.get(k)) for k, v in requested.items()
            if _plain(v) != _plain(known.get(k))}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
