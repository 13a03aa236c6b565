"""Multitask learning with hard parameter sharing (Caruana 1997): one backbone, one head per task.

Two axes are kept apart, as in LibMTL: *sharing* is this regime's (the backbone is shared, each
task has its own head in an ``nn.ModuleDict``); *weighting*, how the task losses combine, is a
strategy from :mod:`sharebone.regimes.weighting`, chosen by name in config. The training step reads
like the method: embed a task-balanced batch once, each head scores its task's examples, the
weighting turns the task losses (and, when it asks, the task-gradient Gramian) into weights,
and the weighted update trains backbone and heads.

For few-shot evaluation a backbone trained this way is scored as Baseline/RFS score theirs:
a fresh linear head is fitted on each episode's support features
(:func:`sharebone.models.heads.fit_linear_classifier`, or ridge regression for regression
tasks) and applied to the query set (:class:`sharebone.regimes.shared.SharedBackboneRegime`).
"""

from __future__ import annotations

from typing import Any

from sharebone.models import BackboneArg
from sharebone.regimes.base import SharingArg, register_regime
from sharebone.regimes.shared import SharedBackboneRegime
from sharebone.regimes.weighting import NonFiniteWeightError

__all__ = ["MultiTask", "NonFiniteWeightError"]


@register_regime("multitask")
class MultiTask(SharedBackboneRegime):
    """Multitask learning, hard parameter sharing (Caruana 1997; survey: Ruder 2017,
    arXiv:1706.05098): a shared backbone, one linear head per task, task losses combined by a
    weighting strategy (:mod:`sharebone.regimes.weighting`: equal, uncertainty, dwa, gradnorm,
    pcgrad, mgda, imtl).

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
        >>> import torch
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
    makes_task_copies = True

    def __init__(self, backbone: BackboneArg, heads: dict[str, int] | None = None,
                 weighting: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 16,
                 conflict_every: int = 10, head_fit: dict[str, Any] | None = None,
                 sharing: SharingArg = None) -> None:
        super().__init__(backbone, heads=heads, weighting=weighting, loss=loss, lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size,
                         conflict_every=conflict_every, head_fit=head_fit, sharing=sharing)
        self.save_hyperparameters()
        self.apply_sharing()
