"""The machinery every regime with a shared backbone and one head per task stands on: the
multitask regime (:mod:`sharebone.regimes.multitask`) and pre-training / fine-tuning
(:mod:`sharebone.regimes.finetune`). Few-shot scoring fits a fresh head per episode
(:func:`sharebone.models.heads.fit_linear_classifier`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sharebone.callbacks.cadence import checks_this_step
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import BackboneArg, ParameterSharing, count_parameters, feature_width
from sharebone.models.heads import (
    DEFAULT_HEAD_FIT,
    HEAD_FITS,
    fit_linear_classifier,
    ridge_predict,
)
from sharebone.regimes.base import FewShotRegime, SharingArg
from sharebone.regimes.branches import Branches
from sharebone.regimes.weighting import (
    Weighting,
    check_finite,
    cosine_matrix,
    create_weighting,
)
from sharebone.task_kind import REGRESSION, task_kind


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Identity forward; multiplies the gradient flowing back into ``x`` by ``scale``. Lets a
    gradient aggregation weigh a task's gradient on the backbone but not on its own head.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_gradient(x, torch.tensor(0.25)).sum().backward()
        >>> x.grad
        tensor([0.2500, 0.2500])
    """
    return _ScaleGradient.apply(x, scale.detach())


def _key(name: str) -> str:
    """A task name as an ``nn.ModuleDict`` key (no dots)."""
    return name.replace(".", "_")


def check_heads(heads: dict[str, int], data: dict[str, int]) -> None:
    """Every task of the data has a head of the right size; raises naming the task."""
    missing = [name for name in data if name not in heads]
    if missing:
        raise SettingError(f"Task(s) {missing} have no head configured (regime.heads has "
                           f"{sorted(heads)}). Add them, or set regime.heads=null to get one head "
                           "per task of the data.")
    wrong = {n: (heads[n], data[n]) for n in data if heads[n] != data[n]}
    if wrong:
        raise SettingError("Head sizes do not fit the data (task: configured, needed): "
                           + ", ".join(f"{n}: {a}, {b}" for n, (a, b) in wrong.items()))


class SharedBackboneRegime(FewShotRegime):
    """A backbone shared by every task, one head per task, weighted task losses.

    The machinery shared by :class:`MultiTask` and the pre-training regime
    (:class:`sharebone.regimes.finetune.Pretrain`, which is this with one task over all
    classes). Training batches are ``(inputs, targets, task)`` from
    :class:`sharebone.data.multitask.TaskBatchDataModule`; validation and few-shot test use
    episodes, answered by a head fitted on each support set.
    """

    follows_sharing_map = True

    def __init__(self, backbone: BackboneArg, heads: dict[str, int] | None = None,
                 weighting: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 16,
                 conflict_every: int = 10, head_fit: dict[str, Any] | None = None,
                 head_builder: Callable[[int, int], nn.Module] | None = None,
                 sharing: SharingArg = None) -> None:
        super().__init__(backbone, sharing)
        self.task_kind = task_kind(loss)
        heads = dict(heads or {})
        bad = {name: n for name, n in heads.items() if not isinstance(n, int) or n < 1}
        if bad:
            raise SettingError(f"Every head needs a positive int output size; got {bad}.")
        width = feature_width(self.backbone)
        build = head_builder or nn.Linear  # (features, outputs) -> a task's head
        self.heads = nn.ModuleDict({_key(name): build(width, n) for name, n in heads.items()})
        self.head_names = list(heads)
        spec = dict(weighting or {"name": "equal"})
        self.weighting: Weighting | None = (
            create_weighting(spec.pop("name"), num_tasks=len(heads), **spec) if heads else None)
        if not heads:  # still fail now on a bad weighting name, not after loading data
            create_weighting(spec.pop("name", "equal"), num_tasks=1, **spec)
        fit = {**DEFAULT_HEAD_FIT, **dict(head_fit or {})}
        if fit["method"] not in HEAD_FITS:
            raise SettingError(f"head_fit.method must be one of {HEAD_FITS}, got "
                               f"{fit['method']!r}.")
        self.head_fit = fit
        self.task_names = list(heads)  # order of task ids in batches; set from the data at fit
        # Read by the shared machinery; subclasses (pre-training) may not expose them as hparams.
        self.conflict_every = conflict_every
        self._conflict_step: int | None = None
        self.lr, self.weight_decay = lr, weight_decay
        #: Per-task copies of backbone tensors (``sharing.task`` / ``branch_at``), or None.
        self.branches: Branches | None = None

    def apply_sharing(self) -> None:
        """The map's roles (:meth:`FewShotRegime.apply_sharing`), and for ``task`` tensors a
        copy per task (:class:`~sharebone.regimes.branches.Branches`); the backbone's own
        values of those are what the copies start from and get no gradient."""
        super().apply_sharing()
        copied = [n for n, r in (self.sharing_roles or {}).items() if r == "task"]
        if not copied:
            return
        if self.test_time is not None:
            raise SettingError("sharing.adapt with per-task branches (sharing.task / "
                               "branch_at): a new task has no branch to fine-tune; use one.")
        own = dict(self.named_parameters())
        for name in copied:
            own[name].requires_grad_(False)
        self.branches = Branches(self.backbone, copied, self.head_names)

    def task_features(self, inputs: torch.Tensor,
                      rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each training task's features of its rows of a batch (its branch, if it has one)."""
        if self.branches is None:
            features = self.backbone(inputs)
            return [features[r] for r in rows]
        return [self.branches.features(self.backbone, name, inputs[r])
                for name, r in zip(self.task_names, rows, strict=True)]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.branches is None:
            return self.backbone(images)
        return self.branches.all_features(self.backbone, images)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data = getattr(datamodule, "data", None)
        if data is not None:
            configured = {n: self.heads[_key(n)].out_features for n in self.head_names}
            check_heads(configured, data.heads)
            self.task_names = list(data.names)
        if self.weighting is None:
            raise SettingError("This model has no task heads; set regime.heads (task -> outputs) "
                               "or leave it null for sharebone-train to fill it from the data.")

    # -- the multitask step ---------------------------------------------------------------------
    def task_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One task's loss on a plain batch: ``outputs [M, outputs]``, ``targets [M]``."""
        return self.task_kind.loss(outputs, targets)

    def task_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One task's metric (accuracy, or MSE) on a plain batch, a scalar."""
        return self.task_kind.metric(outputs.unsqueeze(0), targets.unsqueeze(0))[0]

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def task_gramian(self, losses: torch.Tensor) -> torch.Tensor:
        """``G = J J^T`` of the task gradients ``J [T, n]`` on the shared parameters."""
        params = self.shared_parameters()
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, params, strict=True)]))
        jacobian = torch.stack(rows)
        return jacobian @ jacobian.T

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        inputs, targets, task = batch
        names = self.task_names
        # Each task's rows, with one read of the counts (a GPU sync) for all tasks.
        counts = torch.bincount(task, minlength=len(names)).tolist()
        if len(counts) > len(names):
            raise SettingError(f"Training batch {batch_idx} has task ids up to {len(counts) - 1}, "
                               f"but the model has {len(names)} heads ({names}).")
        rows = list(torch.argsort(task, stable=True).split(counts))
        missing = [names[t] for t, n in enumerate(counts) if n == 0]
        if missing:
            raise SettingError(f"Training batch {batch_idx} has no example of task(s) {missing}; "
                               "task-balanced batches (TaskBatches) always hold every task.")
        heads = [self.heads[_key(name)] for name in names]
        features = self.task_features(inputs, rows)
        outputs = [head(f) for head, f in zip(heads, features, strict=True)]
        losses = torch.stack([self.task_loss(o, targets[r])
                              for o, r in zip(outputs, rows, strict=True)])
        # Naming the task with a NaN loss reads the losses (the NaN guard still stops the run
        # on the objective between checks).
        logs = self.logs_this_step(batch_idx)
        checks = self._trainer is None or checks_this_step(self._trainer, batch_idx,
                                                           losses.device)
        if checks:
            check_finite(losses, names, "loss")

        gramian = (self.task_gramian(losses)
                   if self.weighting.uses_gramian or (logs and self._wants_conflict()) else None)
        weights = self.weighting(losses, gramian)
        if checks:
            check_finite(weights, names, "weight")

        if self.weighting.weighs_heads:
            objective = (weights * losses).sum() + self.weighting.penalty()
        else:  # the weights act on the backbone's gradient only; each head keeps its own
            w = weights.detach()
            objective = sum(self.task_loss(head(scale_gradient(f, w[t])), targets[r])
                            for t, (head, f, r) in enumerate(zip(heads, features, rows,
                                                                 strict=True)))

        if logs:
            self.log_dict(self._step_metrics(objective, losses, weights, outputs, targets, rows,
                                             gramian), batch_size=inputs.shape[0])
        return objective

    def _wants_conflict(self) -> bool:
        """Measure gradient conflict now (a logging step): at most every ``conflict_every``
        steps, as it costs a backward pass per task."""
        every, last = self.conflict_every, self._conflict_step
        if not every or len(self.task_names) < 2 or (
                last is not None and 0 <= self.global_step - last < every):
            return False
        self._conflict_step = self.global_step
        return True

    def _step_metrics(self, objective: torch.Tensor, losses: torch.Tensor,
                      weights: torch.Tensor, outputs: list[torch.Tensor],
                      targets: torch.Tensor, rows: list[torch.Tensor],
                      gramian: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What a training step logs: the objective, each task's loss, score and weight, the
        mean score, and (with a Gramian) how much the tasks' gradients conflict."""
        names = self.task_names
        logged: dict[str, torch.Tensor] = {"train/loss": objective.detach()}
        metric = self.metric_name
        for t, name in enumerate(names):
            logged[f"train/{name}/loss"] = losses[t].detach()
            score = self.task_score(outputs[t].detach(), targets[rows[t]])
            logged[f"train/{name}/{metric}"] = score
            logged[f"train/{name}/weight"] = weights[t].detach()
        logged[f"train/{metric}"] = torch.stack(
            [logged[f"train/{n}/{metric}"] for n in names]).mean()
        if gramian is not None and len(names) > 1:
            cosine = cosine_matrix(gramian.detach())
            off = ~torch.eye(len(names), dtype=torch.bool, device=cosine.device)
            for t, name in enumerate(names):
                logged[f"train/{name}/conflict"] = cosine[t][off[t]].mean()
            logged["train/conflict"] = cosine[off].mean()
        return logged

    def on_train_epoch_end(self) -> None:
        if self.weighting is not None:
            self.weighting.end_epoch()

    # -- few-shot: a fresh head per support set ---------------------------------------------
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        support, query = (f.detach() for f in self.embed_episode(episode))
        fit = self.head_fit
        if self.task_kind is REGRESSION:
            return ridge_predict(support, episode.support_labels, query, l2=fit["l2"])
        head = fit_linear_classifier(support, episode.support_labels, episode.n_way, **fit)
        return head(query)

    def parameter_sharing(self) -> ParameterSharing:
        meta = count_parameters(self.weighting) if self.weighting is not None else 0
        branched = count_parameters(self.branches)
        return ParameterSharing(
            shared=count_parameters(self.backbone) - branched // max(len(self.heads), 1),
            task_specific=count_parameters(self.heads) + branched,
            meta=meta, description=f"{len(self.heads)} trained head(s); few-shot: a fresh "
                                   f"{self.head_fit['method']} head per support set")

    def default_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
