"""How the losses of several tasks combine into one update of the shared backbone.

Hard parameter sharing has two independent axes (LibMTL keeps them in two folders): *which*
parameters are shared (the backbone; :mod:`sharebone.regimes.multitask`) and *how* the task
losses are weighed against each other (this module). A weighting is a small ``nn.Module`` that
maps the task losses ``[T]`` (and, when it asks for it, the Gramian ``G = J J^T`` of the task
gradients ``J [T, n]`` on the shared parameters) to one weight per task. The multitask loop
calls every weighting the same way and never branches on a method's name:

- a **loss weighting** (``weighs_heads = True``: equal, uncertainty, DWA, GradNorm) scales each
  task's whole loss, heads included: the objective is ``sum_t w_t L_t + penalty()``;
- a **gradient aggregation** (``weighs_heads = False``: PCGrad, MGDA, IMTL-G) only decides the
  backbone's update, ``sum_t w_t g_t``; every head still follows its own task's gradient. For
  these the Gramian determines the weights exactly (PCGrad's projections, MGDA's min-norm point
  and IMTL-G's equal projections are all functions of it), so the math comes from ``torchjd``'s
  Gramian weightings (Quinton & Rey, arXiv:2406.16232), not from hand-written solvers.

Add a strategy with ``@register_weighting("name")`` on a subclass of :class:`Weighting`;
``create_weighting(name, num_tasks=..., **options)`` builds one.

Example:
    >>> import torch
    >>> losses = torch.tensor([1.0, 2.0])
    >>> create_weighting("equal", num_tasks=2)(losses)
    tensor([1., 1.])
    >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])     # two conflicting task gradients
    >>> w = create_weighting("pcgrad", num_tasks=2)(losses, jacobian @ jacobian.T)
    >>> (w @ jacobian).tolist()       # each gradient projected off the other's, then summed
    [0.5, 1.5]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sharebone.errors import SettingError
from sharebone.registry import Registry

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")
register_weighting = WEIGHTINGS.register


class NonFiniteWeightError(FloatingPointError):
    """A task's loss or weight became inf/NaN; the message names the task."""


class Weighting(nn.Module):
    """Maps task losses ``[T]`` (and optionally the task-gradient Gramian ``[T, T]``) to task
    weights ``[T]``.

    Class attributes tell the loop what a strategy needs, so it never asks for its name:

    - ``uses_gramian``: ``forward`` needs the Gramian of the task gradients on the shared
      parameters (costs one backward pass per task);
    - ``weighs_heads``: ``True`` for loss weightings (the objective is ``sum w_t L_t``);
      ``False`` for gradient aggregations (only the backbone's gradient is ``sum w_t g_t``).
    """

    uses_gramian: bool = False
    weighs_heads: bool = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise SettingError(f"A weighting needs at least one task, got num_tasks={num_tasks}.")
        self.num_tasks = num_tasks

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | float:
        """A term added to the objective (uncertainty weighting's ``log sigma``); 0 for most."""
        return 0.0

    def end_epoch(self) -> None:
        """Called once per training epoch (DWA's loss history)."""


def create_weighting(name: str, num_tasks: int, **options: Any) -> Weighting:
    """Build a registered weighting, e.g. ``create_weighting("pcgrad", num_tasks=4)``."""
    return WEIGHTINGS.get(name)(num_tasks=num_tasks, **options)


def check_finite(values: torch.Tensor, task_names: Sequence[str], what: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming every task whose ``what`` is inf or NaN."""
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        names = [f"{task_names[i]}={values[i].item()}" for i in rows]
        raise NonFiniteWeightError(
            f"Non-finite task {what} for task(s) {', '.join(names)}. Lower the learning rate, "
            "clip gradients (trainer.gradient_clip_val) or pick another weighting.")


def cosine_matrix(gramian: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity ``[T, T]`` of the task gradients behind a Gramian.

    Example:
        >>> cosine_matrix(torch.tensor([[4.0, -2.0], [-2.0, 1.0]]))
        tensor([[ 1., -1.],
                [-1.,  1.]])
    """
    norms = gramian.diagonal().clamp_min(1e-30).sqrt()
    return gramian / (norms.unsqueeze(0) * norms.unsqueeze(1))


# ----------------------------------------------------------------------------- loss weightings


@register_weighting("equal")
class Equal(Weighting):
    """Every task's loss with weight 1: the plain sum of task losses."""

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ones_like(losses)


@register_weighting("uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, arXiv:1705.07115).

    One learned log-variance ``s_t = log sigma_t^2`` per task; the objective is
    ``sum_t exp(-s_t) L_t + s_t / 2``, the paper's classification form
    ``L / sigma^2 + log sigma`` (its Eq. 10), trained by the regime's optimizer with the rest.
    """

    def __init__(self, num_tasks: int, init_log_variance: float = 0.0) -> None:
        super().__init__(num_tasks)
        self.log_variance = nn.Parameter(torch.full((num_tasks,), float(init_log_variance)))

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        return torch.exp(-self.log_variance)

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.log_variance.sum()


@register_weighting("dwa")
class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, arXiv:1803.10704, Eq. 7).

    ``w_t = T * softmax_t(r_t / temperature)`` with ``r_t = L_t(k-1) / L_t(k-2)``, the ratio of
    the task's mean loss over the last two periods (epochs, or ``period`` steps); ones until
    two periods have been seen.
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0, period: int = 0) -> None:
        super().__init__(num_tasks)
        if temperature <= 0:
            raise SettingError(f"DWA temperature must be > 0, got {temperature}.")
        self.temperature, self.period = float(temperature), int(period)
        self.register_buffer("running", torch.zeros(num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("history", torch.full((2, num_tasks), float("nan")))

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        if bool(torch.isnan(self.history).any()):
            weights = torch.ones_like(losses)
        else:
            ratio = (self.history[1] / self.history[0]).to(losses)
            weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        if self.training:  # this step's losses count from the next period on
            self.running += losses.detach().to(self.running)
            self.steps += 1
            if self.period and int(self.steps) >= self.period:
                self.end_epoch()
        return weights

    def end_epoch(self) -> None:
        if int(self.steps) == 0:
            return
        self.history[0] = self.history[1].clone()
        self.history[1] = self.running / self.steps
        self.running.zero_()
        self.steps.zero_()


@register_weighting("gradnorm")
class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, arXiv:1711.02257).

    Learned loss weights ``w_t`` (summing to ``T``) are moved so that each task's weighted
    gradient norm ``w_t ||g_t||`` approaches ``mean_j(w_j ||g_j||) * r_t^alpha``, where ``r_t``
    is the task's loss ratio ``L_t / L_t(0)`` relative to the mean ratio (the paper's Eq. 1-3).
    The norms are taken over all shared parameters (the paper uses the last shared layer, a
    cost saving). Since ``||w_t g_t|| = w_t ||g_t||``, the gradient of the paper's L1 loss in
    ``w`` is ``sign(w_t n_t - target_t) n_t``, applied with step ``lr``.
    """

    uses_gramian = True

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(num_tasks)
        self.alpha, self.lr = float(alpha), float(lr)
        self.register_buffer("weights", torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        if gramian is None:
            raise SettingError("GradNorm needs the task-gradient Gramian.")
        losses = losses.detach().to(self.weights)
        if bool(torch.isnan(self.initial_losses).any()):
            self.initial_losses.copy_(losses)
        weights = self.weights.clone()
        if self.training:
            norms = gramian.detach().diagonal().clamp_min(0).sqrt().to(self.weights)
            ratio = losses / self.initial_losses
            target = (weights * norms).mean() * (ratio / ratio.mean()) ** self.alpha
            step = torch.sign(weights * norms - target) * norms
            updated = (self.weights - self.lr * step).clamp_min(1e-3)
            self.weights.copy_(updated * self.num_tasks / updated.sum())
        return weights.to(losses)


# --------------------------------------------------------------- gradient aggregation (torchjd)


class GramianAggregation(Weighting):
    """Backbone update ``sum_t w_t g_t`` with ``w`` a function of the Gramian, from torchjd."""

    uses_gramian = True
    weighs_heads = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.gramian_weighting = self.build()

    def build(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, losses: torch.Tensor, gramian: torch.Tensor | None = None) -> torch.Tensor:
        if gramian is None:
            raise SettingError(f"{type(self).__name__} needs the task-gradient Gramian.")
        return self.gramian_weighting(gramian.detach()).to(losses)


@register_weighting("pcgrad")
class PCGrad(GramianAggregation):
    """PCGrad, gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020,
    arXiv:2001.06782, Algorithm 1): each task gradient is projected off the normal plane of any
    other it conflicts with (negative cosine), in random order, and the results are summed."""

    def build(self) -> nn.Module:
        from torchjd.aggregation import PCGradWeighting

        return PCGradWeighting()


@register_weighting("mgda")
class MGDA(GramianAggregation):
    """MGDA (Désidéri 2012; as multitask learning: Sener & Koltun, NeurIPS 2018,
    arXiv:1810.04650): the minimum-norm point of the convex hull of the task gradients, a common
    descent direction; the weights are convex (sum to 1)."""

    def __init__(self, num_tasks: int, epsilon: float = 1e-3, max_iters: int = 100) -> None:
        self.epsilon, self.max_iters = epsilon, max_iters
        super().__init__(num_tasks)

    def build(self) -> nn.Module:
        from torchjd.aggregation import MGDAWeighting

        return MGDAWeighting(epsilon=self.epsilon, max_iters=self.max_iters)


@register_weighting("imtl")
class IMTLG(GramianAggregation):
    """IMTL-G, the gradient half of impartial multitask learning (Liu et al., ICLR 2021): the
    aggregated update has equal projections onto every task's gradient direction."""

    def build(self) -> nn.Module:
        from torchjd.aggregation import IMTLGWeighting

        return IMTLGWeighting()
