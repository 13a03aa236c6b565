"""Pre-training and transfer: a backbone trained on all classes, then moved to a new task.

``pretrain`` is the Baseline/RFS recipe: one linear classifier over every training class,
plain cross-entropy on plain batches (Chen, Liu, Kira, Wang & Huang, ICLR 2019,
arXiv:1904.04232; Tian, Wang, Krishnan, Tenenbaum & Isola, ECCV 2020, arXiv:2003.11539). Its
few-shot score comes from a fresh head fitted on each support set, as the papers do.

``finetune`` takes the backbone of any sharebone checkpoint to a new task (a split of a task
family, e.g. the held-out validation alphabets, ``train_per_class`` images of each class to
train on and the rest to validate on) in one of four modes, each a Lightning finetuning
callback rather than hand-rolled freezing:

- ``probe``: linear probe, the backbone frozen (in eval mode) throughout (``FrozenBackbone``);
- ``full``: everything trains from the start, the backbone at ``lr * backbone_lr_ratio``;
- ``backbone``: Lightning's ``BackboneFinetuning``: head first, the backbone unfrozen at
  ``unfreeze_at_epoch`` with ``backbone_lr_ratio`` of the head's lr, its lr then growing;
- ``gradual``: ULMFiT's gradual unfreezing with discriminative learning rates (Howard & Ruder,
  ACL 2018, arXiv:1801.06146): from ``unfreeze_at_epoch`` one more layer every
  ``unfreeze_every`` epochs, top layer first, layer ``k`` from the top at ``lr * lr_decay^k``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning, BaseFinetuning
from torch import nn

from sharebone.checkpoint_io import (
    CheckpointError,
    describe_backbone,
    find_checkpoint,
    read_checkpoint,
)
from sharebone.data.episodes import Episode, RaggedEpisodes
from sharebone.errors import SettingError
from sharebone.models import (
    BackboneArg,
    ParameterSharing,
    count_parameters,
    feature_width,
    is_module_record,
)
from sharebone.models.analysis import layer_groups
from sharebone.models.backbones import backbone_differences, skip_pretrained_weights
from sharebone.models.heads import (
    CLASSIFIERS,
    DEFAULT_HEAD_FIT,
    CosineClassifier,
    check_scale,
    fit_linear_classifier,
)
from sharebone.models.sharing import is_norm
from sharebone.regimes.base import FewShotRegime, SharingArg, register_regime
from sharebone.regimes.shared import SharedBackboneRegime
from sharebone.regimes.test_time import resolve_roles

__all__ = ["FINETUNE_MODES", "FineTune", "FrozenBackbone", "GradualUnfreezing", "Pretrain",
           "source_backbone"]


@register_regime("pretrain")
class Pretrain(SharedBackboneRegime):
    """Baseline/RFS pre-training: backbone + one classifier over all training classes.

    Shared: the backbone. Task-specific: the classifier (a fresh head per support set at
    few-shot time, fitted as ``head_fit`` says: logistic regression on normalised features,
    RFS's choice, or a few SGD steps, Baseline's). The training task is the family's whole
    train split as one task; ``num_classes`` is filled from it by ``sharebone-train``.
    ``classifier="cosine"`` is Baseline++ (Chen et al. 2019): the classifier is
    ``scale * cos(f, w_k)`` with a learned scale, in pre-training and in each support set's
    fresh head (which takes the trained scale).

    Args:
        backbone: registry spec of the backbone.
        num_classes: classes of the training split (the classifier's outputs).
        lr, weight_decay: Adam.
        batch_size: images per step.
        head_fit: see :class:`~sharebone.regimes.multitask.MultiTask`.
        classifier: ``"linear"`` (Baseline, RFS) or ``"cosine"`` (Baseline++).
        scale: the cosine classifier's initial scale (learned; > 0).

    Example:
        >>> model = Pretrain({"name": "mlp", "in_features": 4, "hidden": [8]}, num_classes=5)
        >>> batch = (torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0]), torch.zeros(6).long())
        >>> model.training_step(batch, 0).shape
        torch.Size([])
        >>> print(model.parameter_sharing())  # doctest: +ELLIPSIS
        shared=40  task-specific=45  (1 trained head(s); ...)
    """

    trains_on = "classes"

    def __init__(self, backbone: BackboneArg, num_classes: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 5e-4, batch_size: int = 64,
                 head_fit: dict[str, Any] | None = None, classifier: str = "linear",
                 scale: float = 10.0, sharing: SharingArg = None) -> None:
        if classifier not in CLASSIFIERS:
            raise SettingError(f"regime.classifier must be one of {CLASSIFIERS}, got "
                               f"{classifier!r}. Fix: regime.classifier=cosine (Baseline++).")
        check_scale(scale)
        builder = (functools.partial(CosineClassifier, scale=scale)
                   if classifier == "cosine" else None)
        super().__init__(backbone, heads={"classes": num_classes} if num_classes else None,
                         weighting={"name": "equal"}, loss="cross_entropy", lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size, conflict_every=0,
                         head_fit=head_fit, head_builder=builder, sharing=sharing)
        self.save_hyperparameters()
        self.apply_sharing()

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """A fresh head on each support set: Baseline++ fits a cosine classifier with the
        trained scale; otherwise the linear head ``head_fit`` says."""
        if self.hparams.classifier != "cosine":
            return super().predict_episode(episode)
        support, query = (f.detach() for f in self.embed_episode(episode))
        trained = self.heads[next(iter(self.heads))].scale if len(self.heads) else None
        scale = self.hparams.scale if trained is None else trained.detach()
        head = fit_linear_classifier(support, episode.support_labels, episode.n_way,
                                     **self.head_fit, cosine_scale=scale)
        return head(query)

    def parameter_sharing(self) -> ParameterSharing:
        sharing = super().parameter_sharing()
        if self.hparams.classifier != "cosine":
            return sharing
        return dataclasses.replace(sharing, description=(
            "Baseline++: 1 trained cosine classifier (learned scale); few-shot: a fresh cosine "
            f"head ({self.head_fit['method']}) per support set"))


# ------------------------------------------------------------------------------- transfer


def source_backbone(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The backbone spec and weights (``backbone.*`` keys, prefix removed) of a sharebone
    checkpoint; :class:`~sharebone.checkpoint_io.CheckpointError` when it has none.

    A run asks for its source several times (checked before any data is read, loaded in
    ``setup``): the file is read once, and again only if it changed in between."""
    resolved = find_checkpoint(path).resolve()
    stat = resolved.stat()
    spec, weights = _read_source(str(resolved), stat.st_size, stat.st_mtime_ns)
    return dict(spec), dict(weights)


@functools.lru_cache(maxsize=2)
def _read_source(path: str, size: int, mtime_ns: int,
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    checkpoint = read_checkpoint(path)
    spec = checkpoint["sharebone"].get("hparams", {}).get("backbone")
    weights = {k[len("backbone."):]: v for k, v in checkpoint.get("state_dict", {}).items()
               if k.startswith("backbone.")}
    if not spec or not weights:
        raise CheckpointError(
            f"{path} has no backbone to transfer (no backbone spec and 'backbone.*' weights; it "
            f"is a '{checkpoint['sharebone'].get('regime')}' checkpoint). Pass regime.source=<a "
            "checkpoint of pretrain, multitask, protonet or maml>.")
    return dict(spec), weights


def transfer_roles(sharing_map: Any, model: nn.Module) -> dict[str, str]:
    """The roles of a fine-tuning run under a sharing map: the new head is the task's own part
    (``task``), the map's ``adapt`` parameters train on the new task, the rest of the
    transferred backbone is ``frozen`` (no gradient, not in the optimizer)."""
    roles = resolve_roles(sharing_map, model, "finetune")
    own = dict(model.named_parameters())
    for name, role in roles.items():
        if name.startswith("head."):
            roles[name] = "task"
        elif role != "adapt":
            roles[name] = "frozen"
            own[name].requires_grad_(False)
    return roles


class FrozenNormStatistics(pl.Callback):
    """Under a sharing map, a norm layer whose parameters are frozen keeps its running
    statistics as transferred too (eval mode), as the probe's frozen backbone does."""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        for module in pl_module.backbone.modules():
            params = list(module.parameters(recurse=False))
            if is_norm(module) and params and not any(p.requires_grad for p in params):
                module.eval()


class FrozenBackbone(BaseFinetuning):
    """Linear probe: the backbone stays frozen, batch norm included, and in eval mode."""

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        pass

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        pl_module.backbone.eval()  # fixed features: running statistics, not batch statistics


class GradualUnfreezing(BaseFinetuning):
    """ULMFiT gradual unfreezing with discriminative learning rates (Howard & Ruder 2018).

    The backbone starts frozen. At epoch ``start + k * every`` layer ``k`` from the top
    (:func:`sharebone.models.analysis.layer_groups`) is unfrozen into its own optimizer group with
    learning rate ``head_lr * decay^(k + 1)``: lower layers, more general, move less.
    """

    def __init__(self, start: int = 1, every: int = 1, decay: float = 1 / 2.6) -> None:
        super().__init__()
        self.start, self.every, self.decay = start, max(1, every), decay

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch < self.start or (epoch - self.start) % self.every:
            return
        k = (epoch - self.start) // self.every
        groups = layer_groups(pl_module.backbone)
        if k >= len(groups):
            return
        modules = list(groups[-1 - k].modules)
        self.make_trainable(modules)
        # Not unfreeze_and_add_param_group: its filter_on_optimizer compares parameters by
        # value (torch.equal), so a freshly initialised batch norm (weight 1, bias 0) counts as
        # already in the optimizer once another one is, and would silently never train.
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.filter_params(modules) if id(p) not in known]
        if params:
            lr = optimizer.param_groups[0]["lr"] * self.decay ** (k + 1)
            optimizer.add_param_group({"params": params, "lr": lr})


def _probe(model: FineTune) -> list[BaseFinetuning]:
    return [FrozenBackbone()]


def _full(model: FineTune) -> list[BaseFinetuning]:
    return []


def _backbone(model: FineTune) -> list[BaseFinetuning]:
    h = model.hparams
    return [BackboneFinetuning(unfreeze_backbone_at_epoch=h.unfreeze_at_epoch,
                               backbone_initial_ratio_lr=h.backbone_lr_ratio, should_align=True)]


def _gradual(model: FineTune) -> list[BaseFinetuning]:
    h = model.hparams
    return [GradualUnfreezing(start=h.unfreeze_at_epoch, every=h.unfreeze_every,
                              decay=h.lr_decay)]


#: Mode name -> the finetuning callbacks that implement it.
FINETUNE_MODES: dict[str, Callable[[FineTune], list[BaseFinetuning]]] = {
    "probe": _probe, "full": _full, "backbone": _backbone, "gradual": _gradual}


@register_regime("finetune")
class FineTune(FewShotRegime):
    """Transfer a trained backbone to a new task: a new linear head, and the backbone frozen,
    fine-tuned, or unfrozen step by step (see the module docstring for the four modes).

    Args:
        source: a sharebone checkpoint (any regime with a backbone) whose backbone is
            transferred; ``None`` starts from random weights (a from-scratch baseline).
        backbone: the backbone spec; must match the source's.
        num_classes: classes of the new task (filled from the data by ``sharebone-train``).
        mode: ``probe`` | ``full`` | ``backbone`` | ``gradual``.
        lr: Adam learning rate of the head (and the reference for the backbone's).
        backbone_lr_ratio: the backbone's lr as a fraction of the head's (``full``,
            ``backbone``).
        unfreeze_at_epoch, unfreeze_every, lr_decay: unfreezing schedule (``backbone``,
            ``gradual``).
        weight_decay: Adam weight decay.
        batch_size: images per step.
        target_split: the split of the task family that is the new task (default ``val``:
            ``sharebone-train``'s few-shot test afterwards then scores classes that neither
            pre-training nor fine-tuning saw).
        train_per_class: images per class to train on; the rest validate.
        head_fit: how few-shot episodes fit a fresh head on this backbone's features.
        sharing: a sharing map instead of ``mode``: its ``adapt`` parameters train on the new
            task with the new head (``task``), the rest of the transferred backbone is
            ``frozen``; ``sharing.adapters`` are added before the source's weights are loaded.
            ``sharing=head`` is the probe, ``all`` full fine-tuning, ``bias`` BitFit, ``norm``
            BN-tuning, ``film`` / ``residual`` / ``lora`` parameter-efficient transfer.

    Example:
        >>> model = FineTune(backbone={"name": "mlp", "in_features": 4, "hidden": [8]},
        ...                  num_classes=3, mode="probe")
        >>> print(model.parameter_sharing())  # doctest: +ELLIPSIS
        shared=40  task-specific=27  (probe: ...)
        >>> [type(c).__name__ for c in model.configure_callbacks()]
        ['FrozenBackbone']
    """

    trains_on = "new_task"
    follows_sharing_map = True

    def __init__(self, source: str | None = None, backbone: BackboneArg | None = None,
                 num_classes: int | None = None, mode: str = "probe", lr: float = 1e-3,
                 backbone_lr_ratio: float = 0.1, unfreeze_at_epoch: int = 1,
                 unfreeze_every: int = 1, lr_decay: float = 1 / 2.6, weight_decay: float = 0.0,
                 batch_size: int = 64, target_split: str = "val", train_per_class: int = 5,
                 head_fit: dict[str, Any] | None = None, sharing: SharingArg = None) -> None:
        if mode not in FINETUNE_MODES:
            raise SettingError(f"mode must be one of {sorted(FINETUNE_MODES)}, got {mode!r}.")
        if source is not None:
            source = str(Path(source).expanduser().resolve())
        if backbone is None:
            if source is None:
                raise SettingError("FineTune needs a source checkpoint or a backbone spec.")
            backbone, _ = source_backbone(source)
            if is_module_record(backbone):
                raise CheckpointError(
                    f"{source} was trained with a backbone given as a module "
                    f"({backbone['module']}), which it cannot rebuild: pass backbone=<a new "
                    "instance of that class> with source=..., and its weights are loaded.")
        # With a source, its weights replace any pretrained ones: do not load those.
        with skip_pretrained_weights() if source is not None else contextlib.nullcontext():
            super().__init__(backbone, sharing)
        self.head = (nn.Linear(feature_width(self.backbone), num_classes)
                     if num_classes else None)
        if self.sharing_map is not None:
            if mode != "probe":
                raise SettingError(
                    f"regime.mode={mode!r} and a sharing map both say what trains on the new "
                    "task; use one (sharing=all is full fine-tuning, sharing=head the probe).")
            self.sharing_roles = transfer_roles(self.sharing_map, self)
        self.head_fit = {**DEFAULT_HEAD_FIT, **dict(head_fit or {})}
        self.save_hyperparameters()
        self.hparams["source"] = source
        if self._module_record is None:
            self.hparams["backbone"] = dict(backbone)
        self._source_loaded = False

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.source and not self._source_loaded:
            spec, weights = source_backbone(self.hparams.source)
            # A module given as the backbone has no spec to compare: its weights must fit.
            given = is_module_record(self.hparams.backbone)
            if not given and backbone_differences(dict(self.hparams.backbone), spec):
                raise CheckpointError(
                    f"{self.hparams.source} has backbone ({describe_backbone(spec)}), this model "
                    f"({describe_backbone(dict(self.hparams.backbone))}).")
            missing, unexpected = self.backbone.load_state_dict(weights, strict=False)
            added = {n.removeprefix("backbone.") for n in self.adapter_names}
            if unexpected or set(missing) - added:
                raise CheckpointError(
                    f"{self.hparams.source}: its backbone weights do not fit this backbone "
                    f"(missing {sorted(set(missing) - added)[:3]}, unexpected "
                    f"{sorted(unexpected)[:3]}).")
            self._source_loaded = True
        if stage == "fit" and self.head is None:
            raise SettingError("No head: set regime.num_classes (sharebone-train fills it).")

    def configure_callbacks(self) -> list[BaseFinetuning]:
        if self.sharing_roles is not None:  # what trains is set by requires_grad already
            return [FrozenNormStatistics()]
        return FINETUNE_MODES[self.hparams.mode](self)

    @property
    def test_time(self) -> None:
        """None: the ``adapt`` set trained on the new task; few-shot scoring fits a head."""
        return None

    # -- steps ----------------------------------------------------------------------------------
    def _scores(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch[0], batch[1]
        logits = self.head(self.backbone(inputs))
        # The batch as one task: the task kind's loss and its per-task metric.
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
        return self.task_kind.loss(logits, targets), self.task_kind.metric(logits, targets)[0]

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, acc = self._scores(batch)
        if self.logs_this_step(batch_idx):
            self.log_dict({"train/loss": loss.detach(), "train/acc": acc},
                          batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Episode | RaggedEpisodes):
            return super().validation_step(batch, batch_idx)
        loss, acc = self._scores(batch)
        self.log_dict({"val/loss": loss, "val/acc": acc}, prog_bar=True,
                      batch_size=batch[0].shape[0])

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        support, query = (f.detach() for f in self.embed_episode(episode))
        head = fit_linear_classifier(support, episode.support_labels, episode.n_way,
                                     **self.head_fit)
        return head(query)

    def parameter_sharing(self) -> ParameterSharing:
        backbone, head = count_parameters(self.backbone), count_parameters(self.head)
        if self.sharing_roles is not None:
            sizes = {n: p.numel() for n, p in self.named_parameters()}
            trains = sum(sizes[n] for n, r in self.sharing_roles.items() if r != "frozen")
            return ParameterSharing(shared=backbone, task_specific=trains,
                                    description=f"sharing map: {trains:,} parameters train "
                                                "on the new task, the rest frozen")
        mode = self.hparams.mode
        adapted = head if mode == "probe" else head + backbone
        how = ("new head on the frozen backbone" if mode == "probe"
               else "new head, backbone fine-tuned")
        return ParameterSharing(shared=backbone, task_specific=adapted,
                                description=f"{mode}: {how}")

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The head at ``lr``; in ``full`` mode the backbone too, at ``lr * backbone_lr_ratio``
        (the other modes add backbone groups as they unfreeze)."""
        h = self.hparams
        head = list(self.head.parameters()) if self.head is not None else []
        groups = [{"params": head, "lr": h.lr}]
        if self.sharing_roles is not None:
            # New parameters (adapters) at the head's lr, transferred ones at the backbone's.
            own = dict(self.named_parameters())
            adapted = [n for n, r in self.sharing_roles.items() if r == "adapt"]
            new = [own[n] for n in adapted if n in self.adapter_names]
            old = [own[n] for n in adapted if n not in self.adapter_names]
            return [g for g in (*groups, {"params": new, "lr": h.lr},
                                {"params": old, "lr": h.lr * h.backbone_lr_ratio})
                    if g["params"]]
        if h.mode == "full":
            groups.append({"params": list(self.backbone.parameters()),
                           "lr": h.lr * h.backbone_lr_ratio})
        return groups
