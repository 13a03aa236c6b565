"""Multitask learning with hard parameter sharing (Caruana 1997): one backbone, one head per task.

Two axes are kept apart, as in LibMTL: *sharing* is this regime's (the backbone is shared, each
task has its own head in an ``nn.ModuleDict``); *weighting*, how the task losses combine, is a
strategy from :mod:`sharebone.regimes.weighting`, chosen by name in config. The training step reads
like the method: embed a task-balanced batch once, each head scores its task's examples, the
weighting turns the task losses (and, when it asks, the task-gradient Gramian) into weights,
and the weighted update trains backbone and heads.

For few-shot evaluation a backbone trained this way is scored as Baseline/RFS score theirs:
a fresh linear head is fitted on each episode's support features (:func:`fit_linear_classifier`,
or ridge regression for regression tasks) and applied to the query set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sharebone.callbacks.cadence import checks_this_step
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import BackboneArg, ParameterSharing, count_parameters, feature_width
from sharebone.regimes.base import FewShotRegime, register_regime
from sharebone.regimes.weighting import (
    NonFiniteWeightError,
    Weighting,
    check_finite,
    cosine_matrix,
    create_weighting,
)
from sharebone.task_kind import REGRESSION, task_kind

HEAD_FITS = ("logistic", "sgd")
DEFAULT_HEAD_FIT: dict[str, Any] = {"method": "logistic", "steps": 100, "lr": 0.5, "l2": 0.01,
                                    "normalize": True}

__all__ = ["LinearClassifier", "MultiTask", "NonFiniteWeightError", "SharedBackboneRegime",
           "fit_linear_classifier", "ridge_predict", "scale_gradient"]


# ------------------------------------------------------------------ a fresh head per episode


@dataclass(frozen=True)
class LinearClassifier:
    """Per-task linear heads ``weight [T, n_way, D]``, ``bias [T, n_way]``."""

    weight: torch.Tensor
    bias: torch.Tensor
    normalize: bool = True

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return features @ self.weight.transpose(1, 2) + self.bias.unsqueeze(1)


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, n_way: int,
                          method: str = "logistic", steps: int = 100, lr: float = 0.5,
                          l2: float = 0.01, normalize: bool = True) -> LinearClassifier:
    """Fit one multinomial logistic-regression head per task on support features.

    ``features [T, S, D]``, ``labels [T, S]``; minimises mean cross-entropy plus
    ``l2 / 2 * ||W||^2`` from zero, on L2-normalised features when ``normalize`` (Tian et al.
    2020's RFS recipe). ``method="logistic"`` runs L-BFGS for up to ``steps`` iterations (the
    convex problem, solved); ``"sgd"`` takes ``steps`` plain gradient steps of size ``lr`` (a
    fine-tuned head's few steps). Gradients are enabled inside, so it works under ``no_grad``.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])           # one task, two ways
        >>> head = fit_linear_classifier(x, torch.tensor([[0, 1]]), n_way=2)
        >>> head(torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])).argmax(-1)
        tensor([[0, 1]])
    """
    if method not in HEAD_FITS:
        raise SettingError(f"head_fit.method must be one of {HEAD_FITS}, got {method!r}.")
    features = features.detach()
    if normalize:
        features = F.normalize(features, dim=-1)
    tasks, _, dim = features.shape
    weight = torch.zeros(tasks, n_way, dim, device=features.device, dtype=features.dtype,
                         requires_grad=True)
    bias = torch.zeros(tasks, n_way, device=features.device, dtype=features.dtype,
                       requires_grad=True)

    def objective() -> torch.Tensor:
        logits = features @ weight.transpose(1, 2) + bias.unsqueeze(1)
        # Sum of per-task mean losses: separable, so one solve fits every task's own head.
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return ce.view(tasks, -1).mean(1).sum() + 0.5 * l2 * weight.pow(2).sum()

    with torch.enable_grad():
        if method == "logistic":
            optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps,
                                          line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            optimizer = torch.optim.SGD([weight, bias], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                objective().backward()
                optimizer.step()
    return LinearClassifier(weight.detach(), bias.detach(), normalize)


def ridge_predict(support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                  l2: float = 0.01) -> torch.Tensor:
    """Ridge regression per task, closed form: ``support [T, S, D]``, ``targets [T, S, O]``
    (regression episodes' labels, ``O = 1``), ``query [T, Q, D]`` -> predictions ``[T, Q, O]``
    (with a bias; dual form, ``S`` small).

    Example:
        >>> x = torch.arange(6.0).view(1, 6, 1)
        >>> ridge_predict(x, 2 * x + 1, torch.tensor([[[10.0]]]), l2=1e-6).round()
        tensor([[[21.]]])
    """
    ones = torch.ones(*support.shape[:-1], 1, dtype=support.dtype, device=support.device)
    xs = torch.cat([support.detach(), ones], -1)
    xq = torch.cat([query.detach(), torch.ones(*query.shape[:-1], 1, dtype=query.dtype,
                                               device=query.device)], -1)
    gram = xs @ xs.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    alpha = torch.linalg.solve(gram + l2 * eye, targets.to(gram.dtype))
    return xq @ xs.transpose(1, 2) @ alpha


# ------------------------------------------------------------------------------ training


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


class SharedBackboneRegime(FewShotRegime):
    """A backbone shared by every task, one head per task, weighted task losses.

    The machinery shared by :class:`MultiTask` and the pre-training regime
    (:class:`sharebone.regimes.finetune.Pretrain`, which is this with one task over all
    classes). Training batches are ``(inputs, targets, task)`` from
    :class:`sharebone.data.multitask.TaskBatchDataModule`; validation and few-shot test use
    episodes, answered by a head fitted on each support set.
    """

    def __init__(self, backbone: BackboneArg, heads: dict[str, int] | None = None,
                 weighting: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 16,
                 conflict_every: int = 10, head_fit: dict[str, Any] | None = None) -> None:
        super().__init__(backbone)
        self.task_kind = task_kind(loss)
        heads = dict(heads or {})
        bad = {name: n for name, n in heads.items() if not isinstance(n, int) or n < 1}
        if bad:
            raise SettingError(f"Every head needs a positive int output size; got {bad}.")
        width = feature_width(self.backbone)
        self.heads = nn.ModuleDict({_key(name): nn.Linear(width, n) for name, n in heads.items()})
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
        features = self.backbone(inputs)
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
        outputs = [head(features[r]) for head, r in zip(heads, rows, strict=True)]
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
            objective = sum(self.task_loss(head(scale_gradient(features[r], w[t])), targets[r])
                            for t, (head, r) in enumerate(zip(heads, rows, strict=True)))

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
        return ParameterSharing(
            shared=count_parameters(self.backbone), task_specific=count_parameters(self.heads),
            meta=meta, description=f"{len(self.heads)} trained head(s); few-shot: a fresh "
                                   f"{self.head_fit['method']} head per support set")

    def default_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


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


@register_regime("multitask")
class MultiTask(SharedBackboneRegime):
    """Multitask learning, hard parameter sharing (Caruana 1997; survey: Ruder 2017,
    arXiv:1706.05098): a shared backbone, one linear head per task, task losses combined by a
    weighting strategy (:mod:`sharebone.regimes.weighting`: equal, uncertainty, dwa, gradnorm,
    pcgrad,
    mgda, imtl).

    Per task it logs ``train/<task>/loss``, ``/acc`` (``/mse``), ``/weight`` and ``/conflict``,
    the mean cosine between that task's gradient on the backbone and the other tasks' (on
    logging steps at most every ``conflict_every`` steps, and on every logging step for
    Gramian-based weightings).

    Args:
        backbone: registry spec of the shared backbone.
        heads: task name -> output size (classes; 1 for regression). ``sharebone-train`` fills
            it from the task family when null.
        weighting: ``{"name": <strategy>, **options}``, e.g. ``{"name": "dwa", "temperature": 2}``.
        loss: ``"cross_entropy"`` or ``"mse"`` (regression tasks).
        lr, weight_decay: Adam.
        batch_size: examples of *each* task per step.
        conflict_every: measure gradient conflict on a logging step at most every this many
            steps (0: only when the weighting computes task gradients anyway).
        head_fit: how few-shot evaluation fits a head on support features:
            ``{"method": "logistic" | "sgd", "steps", "lr", "l2", "normalize"}``.

    Example:
        >>> model = MultiTask({"name": "mlp", "in_features": 4, "hidden": [8]},
        ...                   heads={"a": 3, "b": 2}, weighting={"name": "pcgrad"})
        >>> batch = (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 1]),
        ...          torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> loss = model.training_step(batch, 0)
        >>> loss.backward()
        >>> all(p.grad is not None for p in model.backbone.parameters())
        True
        >>> print(model.parameter_sharing())  # doctest: +ELLIPSIS
        shared=40  task-specific=45  (2 trained head(s); ...)
    """

    trains_on = "tasks"

    def __init__(self, backbone: BackboneArg, heads: dict[str, int] | None = None,
                 weighting: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 16,
                 conflict_every: int = 10, head_fit: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, heads=heads, weighting=weighting, loss=loss, lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size,
                         conflict_every=conflict_every, head_fit=head_fit)
        self.save_hyperparameters()
