"""Any timm model as a shared backbone: ``backbone=timm backbone.model=resnet18``, or
``create_backbone("timm:resnet18")``.

The model is built headless (``timm.create_model(name, num_classes=0)``), so it returns its
pooled pre-logits features, and ``num_features`` is their size. Two things are changed so that
every regime can run it, MAML's functional inner loop included:

- timm's fused norm + activation layers (``BatchNormAct2d``, a subclass of ``nn.BatchNorm2d``
  that also applies dropout and an activation) become a plain ``nn.BatchNorm2d`` followed by
  the same dropout and activation (:class:`BatchNormThenAct`). MAML's transductive batch norm
  replaces every batch norm module by one that only normalises; on ``BatchNormAct2d`` that
  would silently drop the activation.
- activations and dropout run out of place (``inplace=False``), as for sharebone's own nets;
- attention runs unfused by default (``fused_attn=False``): PyTorch's fused
  ``scaled_dot_product_attention`` kernels have no second derivative, which second-order MAML
  and Meta-SGD take through the support pass. At few-shot image sizes (tens of tokens) the
  unfused path costs little; ``fused_attn=True`` is timm's default, for the other regimes.

timm is optional (``pip install timm``, or the ``timm`` extra); it is imported only when a timm
backbone is built. ``pretrained=True`` loads timm's default weights for the model from the
Hugging Face cache (downloading them when online). Offline (``HF_HUB_OFFLINE=1``, or the Hub
does not answer a connection within :data:`HUB_PROBE_SECONDS`) cached weights are loaded from
their file and missing ones are an error at once, instead of huggingface_hub's retries (about
45 s) before the same error.
"""

from __future__ import annotations

import difflib
import os
import socket
import urllib.parse
from typing import Any

import torch
from torch import nn

from sharebone.errors import SettingError, ShareboneError
from sharebone.models.backbones import check_size, pretrained_weights_skipped, register_backbone

__all__ = ["BatchNormThenAct", "PretrainedWeightsError", "TimmBackbone", "import_timm",
           "plain_batch_norms_"]

#: How long the Hub (or the proxy in front of it) may take to accept a connection before
#: pretrained weights count as not downloadable.
HUB_PROBE_SECONDS = 3.0


def import_timm() -> Any:
    """The ``timm`` module, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("A 'timm' backbone needs the timm package: pip install timm (or "
                          "pip install 'sharebone[timm]').") from err
    return timm


class PretrainedWeightsError(ShareboneError, RuntimeError):
    """``backbone.pretrained=true``, and timm's weights are neither cached nor downloadable."""


def _hub_offline_reason() -> str | None:
    """Why nothing can be downloaded from the Hugging Face Hub now, or None when it answers:
    ``HF_HUB_OFFLINE``, or no connection to it (or to the HTTPS proxy) within
    :data:`HUB_PROBE_SECONDS`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                          "all_proxy") if os.environ.get(k)), None)
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        return f"{'the proxy' if proxy else 'the Hub'} {host}:{port} cannot be reached ({err})"
    return None


def _cached_weights(cfg: Any) -> str | None:
    """The file of ``cfg``'s pretrained weights in the Hugging Face cache (timm's own URL cache
    for weights that are not on the Hub), or None."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else [
            "model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
        return None
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        return path if os.path.isfile(path) else None
    return None


def offline_pretrained_overlay(model: str, cfg: Any) -> dict[str, str] | None:
    """``pretrained_cfg_overlay`` for ``timm.create_model``: None when the Hub answers (timm
    downloads or reuses its cache), ``{"file": <cached file>}`` offline, so that timm reads the
    file without trying the network; offline with nothing cached, a clear error at once."""
    reason = _hub_offline_reason()
    if reason is None:
        return None
    cached = _cached_weights(cfg) if cfg is not None else None
    if cached is not None:
        return {"file": cached}
    source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or "none known"
    raise PretrainedWeightsError(
        f"backbone.pretrained=true: timm's pretrained weights for {model!r} ({source}) are not in "
        f"the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and cannot be downloaded: {reason}. "
        f"Fix: on a machine with internet run python -c \"import timm; timm.create_model("
        f"'{model}', pretrained=True)\" and copy its cache here (or point HF_HOME at it); or "
        "give the file, backbone.model_kwargs={pretrained_cfg_overlay: {file: "
        "/path/to/weights.safetensors}}; or use backbone.pretrained=false.")


class BatchNormThenAct(nn.Module):
    """``nn.BatchNorm2d``, then dropout, then an activation: timm's ``BatchNormAct2d`` split into
    parts (same parameters, same buffers, same function)."""

    def __init__(self, norm: nn.BatchNorm2d, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def _plain_copy(bn: nn.modules.batchnorm._BatchNorm) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                           bn.track_running_stats)
    if bn.affine:
        plain.weight, plain.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        plain.running_mean, plain.running_var = bn.running_mean, bn.running_var
        plain.num_batches_tracked = bn.num_batches_tracked
    return plain.train(bn.training)


def plain_batch_norms_(module: nn.Module) -> nn.Module:
    """Replace, in place, every batch norm that also does more (a subclass of
    ``nn.BatchNorm2d`` with ``drop``/``act`` parts, timm's ``BatchNormAct2d``) by a plain
    ``nn.BatchNorm2d`` followed by those parts, sharing its parameters and statistics;
    returns ``module``."""
    for name, child in list(module.named_children()):
        if (isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d
                and hasattr(child, "act")):
            drop = getattr(child, "drop", None) or nn.Identity()
            setattr(module, name, BatchNormThenAct(_plain_copy(child), drop, child.act))
        else:
            plain_batch_norms_(child)
    return module


def _out_of_place_(module: nn.Module) -> None:
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``x -> pooled features [B, num_features]``.

    Args:
        model: a timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet18.a1_in1k``).
        pretrained: load timm's pretrained weights for it (from the Hugging Face cache; a
            clear error when they are neither cached nor downloadable). Not when rebuilding
            from a checkpoint (:func:`~sharebone.models.backbones.skip_pretrained_weights`):
            its weights replace them anyway.
        in_channels: input channels (timm adapts a pretrained first conv to them).
        image_size: input side; passed to models that need it (``img_size``, e.g. ViTs).
        model_kwargs: more keyword arguments for ``timm.create_model`` (``drop_path_rate``...).
        fused_attn: keep timm's fused attention kernels (no second derivative: not for
            second-order MAML / Meta-SGD); ``False`` computes attention with plain tensor ops.

    Example (with timm installed)::

        net = TimmBackbone("resnet18", in_channels=3, image_size=84)
        net(torch.randn(2, 3, 84, 84)).shape, net.num_features   # ([2, 512], 512)
    """

    def __init__(self, model: str, pretrained: bool = False, in_channels: int = 3,
                 image_size: int | None = None, model_kwargs: dict[str, Any] | None = None,
                 fused_attn: bool = False) -> None:
        super().__init__()
        in_channels = check_size("in_channels", in_channels)
        if image_size is not None:
            check_size("image_size", image_size)
        timm = import_timm()
        if not model or not timm.is_model(model):
            close = difflib.get_close_matches(str(model), timm.list_models(), n=5, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise SettingError(f"Unknown timm model {model!r}.{hint} List them with "
                               "timm.list_models('*pattern*').")
        kwargs = dict(model_kwargs or {})
        pretrained = bool(pretrained) and not pretrained_weights_skipped()
        cfg = timm.get_pretrained_cfg(model)
        if image_size and cfg is not None and getattr(cfg, "fixed_input_size", False):
            kwargs.setdefault("img_size", image_size)
        if pretrained and "file" not in (kwargs.get("pretrained_cfg_overlay") or {}):
            overlay = offline_pretrained_overlay(model, cfg)
            if overlay is not None:
                kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}),
                                                    **overlay}
        try:
            self.model = timm.create_model(model, pretrained=pretrained, num_classes=0,
                                           in_chans=in_channels, **kwargs)
        except OSError as err:  # not cached and not downloadable (offline), or unreadable
            if not pretrained:
                raise
            raise PretrainedWeightsError(
                f"Could not load timm's pretrained weights for {model!r}: they are not in the "
                "Hugging Face cache (HF_HOME / HF_HUB_CACHE) and could not be downloaded "
                f"({type(err).__name__}: {err}). On a machine with internet, run python -c "
                f"\"import timm; timm.create_model('{model}', pretrained=True)\" and copy the "
                "cache here (or point HF_HOME at it), or use backbone.pretrained=false."
            ) from err
        plain_batch_norms_(self.model)
        _out_of_place_(self.model)
        if not fused_attn:
            for m in self.model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        # Models with a pre-logits layer (MobileNetV3, MambaOut...) return head_hidden_size
        # features, wider than their trunk's num_features.
        self.num_features = int(getattr(self.model, "head_hidden_size", None)
                                or self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_groups(self) -> list[Any]:
        """Layers for gradual unfreezing and layer analysis (:func:`sharebone.models.analysis.
        layer_groups`), input to output: the timm model's parameterised children, a block
        container (``blocks``, ``layer1``, ``stages``...) split into its blocks, a norm joining
        the layer before it (ResNet-18: stem, 8 blocks; ViT: patch embedding, each block).
        Parameters the model holds itself (a ViT's ``cls_token``, ``pos_embed``) are in no
        layer."""
        from sharebone.models.analysis import LayerGroup

        norms = (nn.modules.batchnorm._BatchNorm, BatchNormThenAct, nn.LayerNorm, nn.GroupNorm)
        groups: list[tuple[str, list[nn.Module]]] = []
        for name, child in self.model.named_children():
            if not any(True for _ in child.parameters()):
                continue
            parts = [(f"model.{name}", child)]
            if isinstance(child, nn.Sequential | nn.ModuleList):
                inner = [(f"model.{name}.{n}", c) for n, c in child.named_children()
                         if any(True for _ in c.parameters())]
                parts = inner if len(inner) > 1 else parts
            for part_name, part in parts:
                if isinstance(part, norms) and groups:
                    groups[-1][1].append(part)
                else:
                    groups.append((part_name, [part]))
        return [LayerGroup(name, tuple(modules)) for name, modules in groups]


@register_backbone("timm")
def timm_backbone(model: str = "resnet18", pretrained: bool = False, in_channels: int = 3,
                  image_size: int | None = None,
                  model_kwargs: dict[str, Any] | None = None,
                  fused_attn: bool = False) -> TimmBackbone:
    return TimmBackbone(model=model, pretrained=pretrained, in_channels=in_channels,
                        image_size=image_size, model_kwargs=model_kwargs, fused_attn=fused_attn)
