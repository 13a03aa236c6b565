"""learn2learn as an alternative inner-loop backend of the MAML family (``backend="learn2learn"``).

Same model, same episode, same numerics as sharebone's own loop (``tests/test_l2l_parity.py``),
driven the way learn2learn's examples drive it: wrap the network in ``l2l.algorithms.MAML`` (or
``MetaSGD``), ``clone()``, ``adapt(loss)`` per step. For comparison and benchmarks; learn2learn
is imported only when this backend runs, so the core never requires it.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["learn2learn_available", "task_predictions"]


def learn2learn_available() -> bool:
    return importlib.util.find_spec("learn2learn") is not None


class AdaptsTasks(Protocol):
    """What this backend uses of a MAML-family regime (:class:`~sharebone.regimes.maml.regime.
    MAML`), named here so the backend does not import the regime that imports it."""

    options: Any
    adapts_backbone: bool
    backbone: nn.Module
    head: nn.Module | None

    def features(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                 step: int) -> torch.Tensor: ...
    def initial_params(self, *args: Any) -> dict[str, torch.Tensor]: ...
    def inner_step_sizes(self, *args: Any) -> Any: ...
    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


class _FixedLinear(nn.Module):
    """A linear layer whose weights are given tensors (a task's head, as learn2learn adapts it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self._parameters["weight"] = weight
        self._parameters["bias"] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def task_predictions(model: AdaptsTasks, support: torch.Tensor, support_labels: torch.Tensor,
                     query: torch.Tensor, n_way: int, steps: int, first_order: bool,
                     meta_gradient: bool = True) -> torch.Tensor:
    """One task's query predictions, adapted by learn2learn: what
    ``MAML._task_predictions`` computes with sharebone's inner loop."""
    import learn2learn as l2l

    options = model.options
    head_only = not model.adapts_backbone
    if head_only:  # ANIL: the head adapts on features of the fixed backbone
        support, query = model.features({}, support, 0), model.features({}, query, 0)
    init = model.initial_params(support, support_labels, n_way, support if head_only else None)
    modules: list[nn.Module] = [] if head_only else [model.backbone]
    if model.head is not None:
        # A zero head is a fresh constant: learn2learn differentiates with respect to it.
        head = {k: v if v.requires_grad else v.requires_grad_() for k, v in init.items()
                if k.startswith("head.")}
        modules.append(_FixedLinear(head["head.weight"], head["head.bias"]))
    net = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    if options.learn_step_sizes:
        sizes = model.inner_step_sizes(init, n_way)
        # net.parameters() order: the backbone's, then the head's, as in initial_params.
        learner = l2l.algorithms.MetaSGD(net, lrs=[sizes[k] for k in init],
                                         first_order=first_order)
    else:
        learner = l2l.algorithms.MAML(net, lr=options.inner_lr, first_order=first_order)
    learner = learner.clone()
    for _ in range(steps):
        learner.adapt(model.task_loss(learner(support), support_labels))
    with contextlib.nullcontext() if meta_gradient else torch.no_grad():
        return learner(query)
