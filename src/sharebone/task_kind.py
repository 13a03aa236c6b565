"""Classification or regression: the one place that knows what a task's loss and score are.

A regime's ``loss`` option (``"cross_entropy"`` or ``"mse"``) names a :class:`TaskKind`;
training losses, per-task scores, the metric's name and which direction is better all come
from it, so no regime, evaluator or logger branches on the loss's name.

Shapes (``T`` tasks of a meta-batch, ``M`` examples each):

- classification: predictions are logits ``[..., M, n_way]``, labels int64 ``[..., M]``;
- regression: predictions ``[..., M, 1]`` (one output per example), labels ``[..., M, 1]``,
  the predictions' shape, as :class:`~sharebone.data.episodes.Episode` holds them. Labels
  ``[..., M]`` (one number per example, as plain multitask batches hold them) are read as
  ``[..., M, 1]``; any other shape is an error, never a broadcast.

Example:
    >>> kind = task_kind("mse")
    >>> kind.metric_name, kind.higher_is_better
    ('mse', False)
    >>> kind.metric(torch.zeros(2, 3, 1), torch.ones(2, 3, 1))      # per task
    tensor([1., 1.])
    >>> logits = torch.eye(3).expand(2, 3, 3)                      # predicts 0, 1, 2
    >>> task_kind("cross_entropy").metric(logits, torch.tensor([[0, 1, 2], [0, 1, 1]]))
    tensor([1.0000, 0.6667])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sharebone.errors import SettingError

__all__ = ["CLASSIFICATION", "LOSSES", "REGRESSION", "TaskKind", "accuracy", "squared_error",
           "task_kind"]

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _class_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.shape != logits.shape[:-1]:
        raise SettingError(f"Classification labels must have the logits' shape without the class "
                           f"dimension: logits {tuple(logits.shape)} need labels "
                           f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}.")
    return labels


def _targets(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``targets`` as the predictions' shape (a missing trailing output dimension of size 1
    is added); any other mismatch raises."""
    if targets.shape == predictions.shape[:-1] and predictions.shape[-1:] == (1,):
        targets = targets.unsqueeze(-1)
    if targets.shape != predictions.shape:
        raise SettingError(f"Regression targets must have the predictions' shape (one output per "
                           f"example: [..., M, 1]), or that shape without its last dimension: "
                           f"predictions {tuple(predictions.shape)}, targets "
                           f"{tuple(targets.shape)}.")
    return targets.to(predictions.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every example, whatever the leading dimensions."""
    return F.cross_entropy(logits.flatten(0, -2), _class_labels(logits, labels).flatten())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy ``[T]`` of logits ``[T, M, n_way]`` against labels ``[T, M]``."""
    hits = logits.argmax(-1) == _class_labels(logits, labels)
    return hits.float().flatten(1).mean(1)


def mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every example."""
    return F.mse_loss(predictions, _targets(predictions, targets))


def squared_error(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mean squared error ``[T]`` of predictions ``[T, M, 1]``."""
    return (predictions - _targets(predictions, targets)).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class TaskKind:
    """What kind of prediction a task asks for, and how it is scored.

    Attributes:
        name: ``"classification"`` or ``"regression"``.
        loss_name: the regimes' ``loss`` option that selects it.
        metric_name: what few-shot evaluation and the loggers report (``"acc"``, ``"mse"``).
        higher_is_better: the metric's direction (checkpointing on ``val/<metric>``).
        label_shape: the labels' shape, given the predictions' (see the module docstring).
        loss: ``(predictions, labels) -> scalar``, the mean over every example.
        metric: ``(predictions, labels) -> [T]``, the score of each task (the leading
            dimension); one task's plain batch is scored as a meta-batch of one.
    """

    name: str
    loss_name: str
    metric_name: str
    higher_is_better: bool
    label_shape: str
    loss: Score = field(repr=False)
    metric: Score = field(repr=False)


CLASSIFICATION = TaskKind("classification", "cross_entropy", "acc", True,
                          "int64 [..., M] for logits [..., M, n_way]", cross_entropy, accuracy)
REGRESSION = TaskKind("regression", "mse", "mse", False,
                      "float [..., M, 1], the predictions' shape ([..., M] is read as it)",
                      mse, squared_error)
_KINDS = {kind.loss_name: kind for kind in (CLASSIFICATION, REGRESSION)}
#: The regimes' ``loss`` options.
LOSSES = tuple(_KINDS)


def task_kind(loss: str) -> TaskKind:
    """The task kind a regime's ``loss`` option names."""
    try:
        return _KINDS[loss]
    except (KeyError, TypeError):
        raise SettingError(f"loss must be one of {LOSSES}, got {loss!r}: 'cross_entropy' for "
                           "classification (scored by accuracy), 'mse' for regression (scored by "
                           "mean squared error).") from None
