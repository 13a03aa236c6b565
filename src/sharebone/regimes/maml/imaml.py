"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019, arXiv:1909.04630).

A task's parameters solve a proximally regularised inner problem,
``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2``, approximated by ``inner_steps``
SGD steps from ``theta`` that keep no graph. The meta-gradient comes from the implicit function
theorem at ``phi``, not from backpropagating through the steps::

    g = grad_phi L_query(phi)
    solve (I + H / lam) v = g           # H = hessian of L_support at phi; conjugate gradient,
                                        # cg_steps Hessian-vector products
    d L_query / d theta = v

so memory holds one support pass's double-backward graph, whatever ``inner_steps`` is.
Parameters that are shared but do not adapt (a sharing map's ``shared`` role: ANIL's backbone,
BOIL's head) get their exact implicit gradient as well,
``dL/dw = d_w L_query - (1/lam) d_w [grad_phi L_support(phi, w) . v]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from sharebone.adaptation import Params, adapt
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import ParameterSharing
from sharebone.regimes.base import register_regime
from sharebone.regimes.maml.options import refuse_inapplicable
from sharebone.regimes.maml.regime import MAML

Vectors = list[torch.Tensor]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def conjugate_gradient(matvec: Callable[[Vectors], Vectors], b: Vectors, steps: int) -> Vectors:
    """``steps`` iterations of conjugate gradient on ``A x = b`` from ``x = 0``, ``A`` given as
    ``matvec`` (symmetric positive definite for convergence). A fixed number of steps, no
    early stop: stopping on the residual would read it on the host at every step.

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x, = conjugate_gradient(lambda v: [a @ v[0]], [torch.tensor([1.0, 2.0])], steps=2)
        >>> x                                   # exact after n steps on an n x n system
        tensor([0.0909, 0.6364])
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        # A zero residual (b = 0, or converged) gives 0/0: step by nothing instead.
        alpha = torch.where(curvature != 0, rs / curvature, torch.zeros_like(rs))
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * api for ri, api in zip(r, ap, strict=True)]
        rs_new = _dot(r, r)
        beta = torch.where(rs != 0, rs_new / rs, torch.zeros_like(rs))
        p = [ri + beta * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x


def _or_zero(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Vectors:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


@register_regime("imaml")
class IMAML(MAML):
    """iMAML: MAML whose meta-gradient is implicit, through the regularised inner problem.

    Shared: the initialisation ``theta`` of what adapts (a sharing map's ``adapt`` set; by
    default every parameter) and anything shared. Task-specific: the adapted parameters
    ``phi``, ``inner_steps`` SGD steps on ``L_support(phi) + lam/2 ||phi - theta||^2`` (at
    evaluation too: the same inner problem). Outer objective: the query loss at ``phi``,
    differentiated implicitly (module docstring).

    Args (beyond :class:`~sharebone.regimes.maml.regime.MAML`'s inner-loop options;
    ``first_order`` and ``learn_step_sizes`` stay false):
        lam: the proximal regulariser's strength (> 0; the paper: 2.0 on Omniglot 5-way).
        cg_steps: conjugate-gradient iterations (Hessian-vector products) per task (>= 1; the
            paper: 5).
        cg_damping: ``delta`` >= 0 in ``((1 + delta) I + H / lam) v = g``, which keeps CG
            stable where ``H`` is not positive definite (the paper's code: 1.0); 0 is the exact
            implicit gradient.

    Example:
        >>> import torch
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> model = IMAML({"name": "mlp", "in_features": 4, "hidden": [8]}, n_way=3,
        ...               inner_steps=5, lam=2.0, cg_steps=3)
        >>> episode = EpisodeSampler(torch.randn(30, 4), torch.arange(30) // 10, 3, 2, 4).batch([0])
        >>> loss, _ = model.episode_loss(episode)
        >>> loss.backward()
        >>> all(p.grad is not None for p in model.parameters())
        True
    """

    preset: ClassVar[dict[str, Any]] = {"first_order": False}

    def __init__(self, *args: Any, lam: float = 2.0, cg_steps: int = 5,
                 cg_damping: float = 1.0, **kwargs: Any) -> None:
        if isinstance(lam, bool) or not lam > 0:
            raise SettingError(f"regime.lam must be > 0 (the proximal term lam/2 ||phi - "
                               f"theta||^2 ties a task to the initialisation), got {lam!r}. "
                               "Fix: regime.lam=2.0 (the paper, Omniglot).")
        if isinstance(cg_steps, bool) or int(cg_steps) != cg_steps or cg_steps < 1:
            raise SettingError(f"regime.cg_steps must be an integer >= 1 (conjugate-gradient "
                               f"iterations; 0 would give no meta-gradient), got "
                               f"{cg_steps!r}. Fix: regime.cg_steps=5 (the paper).")
        if isinstance(cg_damping, bool) or not cg_damping >= 0:
            raise SettingError(f"regime.cg_damping must be >= 0, got {cg_damping!r}. Fix: "
                               "regime.cg_damping=1.0 (the paper's code) or 0 (exact).")
        super().__init__(*args, **kwargs)

    def check_family_options(self) -> None:
        options = self.options
        refuse_inapplicable(options, "iMAML", (
                ("first_order", options.first_order, "its meta-gradient is implicit; "
                                                     "first order is regime=fomaml"),
                ("learn_step_sizes", options.learn_step_sizes, "the implicit gradient does not "
                                                               "reach the inner loop's steps"),
                ("backend", options.backend != "torch_func", "its inner loop is sharebone's"),
                ("checkpoint_inner_steps", options.checkpoint_inner_steps,
                 "no inner step is kept for the backward: memory is flat in inner_steps"),
                ("vmap_chunk_size", options.vmap_chunk_size is not None,
                 "meta-training loops over tasks, one task's memory at a time")))

    # -- the inner problem ---------------------------------------------------------------------
    def _proximal_solve(self, support_loss: Callable[[Params, int], torch.Tensor],
                        start: Params, steps: int, n_way: int,
                        functional: bool = False) -> Params:
        """``steps`` first-order SGD steps on ``L_support + lam/2 ||phi - theta||^2`` from
        ``theta`` (held as a constant): no graph is kept."""
        anchor = {k: v.detach() for k, v in start.items()}
        lam = self.hparams.lam

        def proximal(p: Params, step: int) -> torch.Tensor:
            distance = sum(((p[k] - anchor[k]) ** 2).sum() for k in anchor)
            return support_loss(p, step) + 0.5 * lam * distance

        return adapt(proximal, anchor, steps, self.inner_step_sizes(start, n_way),
                     first_order=True, functional=functional)

    def adapt_task(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                   steps: int, first_order: bool, functional: bool = False,
                   checkpoint: bool = False) -> tuple[Params, torch.Tensor | None]:
        """A task's ``phi``: the proximal inner problem, as meta-training solves it."""
        params, fixed, support_loss, features = self.task_problem(support, support_labels,
                                                                  n_way)
        return self._proximal_solve(support_loss, params, steps, n_way, functional) | fixed, \
            features

    # -- the implicit meta-gradient ------------------------------------------------------------
    def task_meta_gradient(self, support: torch.Tensor, support_labels: torch.Tensor,
                           query: torch.Tensor, query_labels: torch.Tensor, n_way: int,
                           params: Sequence[torch.Tensor]) -> tuple[Vectors, torch.Tensor]:
        """One task's implicit meta-gradient on ``params`` (the module's trainable parameters)
        and its query predictions (no graph)."""
        h, steps = self.hparams, self.options.inner_steps
        start, fixed, support_loss, _ = self.task_problem(support, support_labels, n_way,
                                                          twice_differentiable=True)
        phi = {k: v.detach().requires_grad_()
               for k, v in self._proximal_solve(support_loss, start, steps, n_way).items()}
        names, leaves = list(phi), list(phi.values())
        with torch.enable_grad():
            predictions = self.predict_with(phi | fixed, query, steps)
            grads = torch.autograd.grad(self.task_loss(predictions, query_labels),
                                        [*leaves, *params], allow_unused=True)
            g, direct = _or_zero(grads[:len(leaves)], leaves), grads[len(leaves):]
            # grad_phi L_support at phi, kept differentiable: its products with a vector give
            # Hessian-vector products (wrt phi) and the mixed term (wrt the shared params).
            support_grad = torch.autograd.grad(support_loss(phi, steps - 1), leaves,
                                               create_graph=True)

            def matvec(u: Vectors) -> Vectors:
                hu = _or_zero(torch.autograd.grad(support_grad, leaves, grad_outputs=u,
                                                  retain_graph=True, allow_unused=True), u)
                return [(1 + h.cg_damping) * ui + hi / h.lam for ui, hi in zip(u, hu,
                                                                                strict=True)]

            v = [t.detach() for t in conjugate_gradient(matvec, g, h.cg_steps)]
            # Only parameters outside phi (shared, or a fixed head's source) can appear in the
            # support loss at phi: with every parameter adapting there is no mixed term.
            adapted = {id(t) for t in start.values()}
            outside = [i for i, p in enumerate(params) if id(p) not in adapted]
            mixed: list[torch.Tensor | None] = [None] * len(params)
            carried = [(s, t) for s, t in zip(support_grad, v, strict=True) if s.requires_grad]
            if outside and carried:
                found = torch.autograd.grad([s for s, _ in carried],
                                            [params[i] for i in outside],
                                            grad_outputs=[t for _, t in carried],
                                            allow_unused=True)
                for i, term in zip(outside, found, strict=True):
                    mixed[i] = term
            # theta itself, and whatever it was built from (a proto head: the backbone).
            begun = [(start[k], t) for k, t in zip(names, v, strict=True)
                     if start[k].requires_grad]
            via_start = (torch.autograd.grad([s for s, _ in begun], params,
                                             grad_outputs=[t for _, t in begun],
                                             allow_unused=True)
                         if begun else [None] * len(params))
        total = []
        for p, d, m, s in zip(params, direct, mixed, via_start, strict=True):
            part = torch.zeros_like(p)
            for term, weight in ((d, 1.0), (m, -1.0 / h.lam), (s, 1.0)):
                if term is not None:
                    part = part + weight * term
            total.append(part)
        return total, predictions.detach()

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-training: the mean query loss at each task's ``phi``, carrying the mean implicit
        meta-gradient (one task's graph at a time); otherwise MAML's (adapt, then score)."""
        if not (self.training and torch.is_grad_enabled()):
            return super().episode_loss(episode)
        episode = self.model_input(episode)
        self._check_training_ways(episode.n_way)
        params = [p for p in self.parameters() if p.requires_grad]
        meta = [torch.zeros_like(p) for p in params]
        predictions = []
        for task in zip(episode.support, episode.support_labels, episode.query,
                        episode.query_labels, strict=True):
            grads, task_predictions = self.task_meta_gradient(*task, episode.n_way, params)
            meta = [m + g / episode.num_tasks for m, g in zip(meta, grads, strict=True)]
            predictions.append(task_predictions)
        predictions = torch.stack(predictions)
        loss = self.task_loss(predictions, episode.query_labels)
        carrier = sum(((p * g).sum() for p, g in zip(params, meta, strict=True)),
                      loss.new_zeros(()))
        return loss + (carrier - carrier.detach()), predictions

    def parameter_sharing(self) -> ParameterSharing:
        h = self.hparams
        return dataclasses.replace(
            super().parameter_sharing(),
            description=f"iMAML: {self.options.inner_steps} SGD step(s) on the support loss + "
                        f"{h.lam}/2 ||phi - theta||^2; implicit meta-gradient by "
                        f"{h.cg_steps} CG step(s)")
