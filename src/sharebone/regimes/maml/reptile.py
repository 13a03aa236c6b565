"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999), on the MAML family's inner loop.

Per meta-batch, the paper's Algorithm 2 (batched)::

    for each task i:   phi_i = adapt(theta, support_i)     # sharebone.adaptation.adapt, 1st order
    theta <- theta + epsilon * mean_i (phi_i - theta)       # Lightning's optimizer step

No backward pass runs through the inner loop, nor through the query set: ``theta - phi_i`` is
handed to the optimizer as the meta-gradient. With ``outer_step="interpolate"`` (the paper's
update) that optimizer is plain SGD at ``lr`` = ``epsilon``, whose size is annealed linearly
from ``lr`` to ``lr_final`` over the run (the paper: 1.0 to 0); ``outer_step="optimizer"`` hands
``theta - phi`` to the run's ``optimizer=`` instead, e.g. Adam, as the paper also suggests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from sharebone.adaptation import adapt
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import ParameterSharing
from sharebone.regimes.base import register_regime
from sharebone.regimes.maml.options import refuse_inapplicable
from sharebone.regimes.maml.regime import MAML

OUTER_STEPS = ("interpolate", "optimizer")


@register_regime("reptile")
class Reptile(MAML):
    """Reptile: move the initialisation towards each task's adapted parameters.

    Shared: the initialisation of what adapts (by default every parameter; a sharing map's
    ``adapt`` set). Task-specific: those parameters after ``inner_steps`` first-order SGD steps
    on the support set, as in MAML. Outer objective: none is differentiated; the outer step is
    ``theta <- theta + lr * mean_i (phi_i - theta)``. The query set only scores the adapted
    model for the logs (``train/loss``, ``train/acc``).

    Args (beyond :class:`~sharebone.regimes.maml.regime.MAML`'s, whose inner-loop options it
    takes; ``first_order`` must stay true):
        lr: the outer step size epsilon at the start (the paper: 1.0 with ``interpolate``).
        lr_final: epsilon at the end of the run, reached linearly (the paper: 0).
        anneal_steps: optimizer steps over which epsilon goes from ``lr`` to ``lr_final``;
            ``None``: the run's length (``trainer.estimated_stepping_batches``).
        outer_step: ``"interpolate"`` (plain SGD on ``theta - phi``, the paper's update,
            whatever ``optimizer=`` says) or ``"optimizer"`` (the run's ``optimizer=``).

    Example:
        >>> import torch
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> model = Reptile({"name": "mlp", "in_features": 4, "hidden": [8]}, n_way=3,
        ...                 inner_steps=2, inner_lr=0.4)
        >>> episode = EpisodeSampler(torch.randn(30, 4), torch.arange(30) // 10, 3, 2, 4).batch([0])
        >>> loss, _ = model.episode_loss(episode)
        >>> loss.backward()                   # p.grad = theta - phi, averaged over the tasks
        >>> all(p.grad is not None for p in model.parameters())
        True
    """

    preset: ClassVar[dict[str, Any]] = {"first_order": True}

    def __init__(self, *args: Any, lr: float = 1.0, lr_final: float = 0.0,
                 anneal_steps: int | None = None, outer_step: str = "interpolate",
                 **kwargs: Any) -> None:
        # Checked first: the MAML constructor saves hyperparameters and builds the model.
        if outer_step not in OUTER_STEPS:
            raise SettingError(f"regime.outer_step must be one of {OUTER_STEPS}, got "
                               f"{outer_step!r}. Fix: outer_step=interpolate (the paper).")
        if not lr > 0 or not lr_final >= 0:
            raise SettingError(f"regime.lr={lr!r} / regime.lr_final={lr_final!r}: Reptile's "
                               "outer step size starts > 0 and anneals to a value >= 0. Fix: "
                               "lr=1.0 lr_final=0.0 (the paper).")
        if anneal_steps is not None and (isinstance(anneal_steps, bool) or anneal_steps < 1):
            raise SettingError(f"regime.anneal_steps must be an integer >= 1 or null (the run's "
                               f"length), got {anneal_steps!r}.")
        super().__init__(*args, lr=lr, **kwargs)

    def check_family_options(self) -> None:
        options = self.options
        if not options.first_order:
            raise SettingError(
                "regime.first_order=false: Reptile is first order by construction (its outer "
                "step is theta - phi, nothing is differentiated through the inner loop). Fix: "
                "leave regime.first_order=true, or use regime=maml for second order.")
        refuse_inapplicable(options, "Reptile", (
                ("learn_step_sizes", options.learn_step_sizes, "theta - phi gives step sizes "
                                                               "no gradient"),
                ("backend", options.backend != "torch_func", "its inner loop is sharebone's"),
                ("checkpoint_inner_steps", options.checkpoint_inner_steps,
                 "no inner step is kept for a backward anyway"),
                ("vmap_chunk_size", options.vmap_chunk_size is not None,
                 "meta-training loops over tasks, one task's memory at a time")))
        own = dict(self.named_parameters())
        idle = [n for n, role in self.sharing_roles.items()
                if role == "shared" and n in own and own[n].requires_grad]
        if idle:
            source = "sharing.adapt" if self.hparams.get("sharing") else "regime.adapt"
            raise SettingError(
                f"{source}: Reptile moves a parameter only towards its adapted value, so the "
                f"{len(idle)} shared tensor(s) that do not adapt ({', '.join(idle[:3])}) would "
                "never train. Fix: adapt them too (sharing=all), or freeze them "
                "(sharing.frozen=[...]).")

    # -- the outer step ------------------------------------------------------------------------
    def _task_difference(self, support: torch.Tensor, support_labels: torch.Tensor,
                         query: torch.Tensor, n_way: int) -> tuple[dict, dict, torch.Tensor]:
        """One task: its start ``theta`` (with graph), ``theta - phi`` (no graph) and the
        adapted model's query predictions (no graph)."""
        params, fixed, support_loss, _ = self.task_problem(support, support_labels, n_way)
        adapted = adapt(support_loss, params, self.options.inner_steps,
                        self.inner_step_sizes(params, n_way), first_order=True)
        difference = {k: (params[k] - adapted[k]).detach() for k in params}
        with torch.no_grad():
            predictions = self.predict_with(adapted | fixed, query, self.options.inner_steps)
        return params, difference, predictions

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-training: the adapted models' mean query loss (for the logs) carrying
        ``theta - mean_i phi_i`` as its gradient; otherwise MAML's (adapt, then score)."""
        if not (self.training and torch.is_grad_enabled()):
            return super().episode_loss(episode)
        episode = self.model_input(episode)
        self._check_training_ways(episode.n_way)
        carrier, predictions = 0.0, []
        for support, support_labels, query in zip(episode.support, episode.support_labels,
                                                  episode.query, strict=True):
            start, difference, task_predictions = self._task_difference(
                support, support_labels, query, episode.n_way)
            # d/d theta of sum(theta * d) is d: backward puts theta - phi into p.grad (through
            # whatever theta was built from: a proto head's prototypes reach the backbone).
            carrier = carrier + sum((start[k] * difference[k]).sum() for k in start)
            predictions.append(task_predictions)
        predictions = torch.stack(predictions)
        loss = self.task_loss(predictions, episode.query_labels)
        carrier = carrier / episode.num_tasks
        return loss + (carrier - carrier.detach()), predictions

    def configure_optimizers(self) -> Any:
        if self.hparams.outer_step == "optimizer":
            return super().configure_optimizers()
        optimizer = torch.optim.SGD(self.optimizer_param_groups(), lr=self.hparams.lr)
        scheduler = (self.scheduler_factory(optimizer) if self.scheduler_factory is not None
                     else self.default_scheduler(optimizer))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The paper's linear annealing of the outer step size, ``lr`` to ``lr_final``."""
        steps = self.hparams.anneal_steps
        if steps is None:
            trainer = self._trainer
            total = trainer.estimated_stepping_batches if trainer is not None else float("inf")
            steps = total if total and total != float("inf") else None
        final = self.hparams.lr_final / self.hparams.lr
        if steps is None:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 1.0 - (1.0 - final) * min(i / steps, 1.0))

    def parameter_sharing(self) -> ParameterSharing:
        return dataclasses.replace(
            super().parameter_sharing(),
            description=f"Reptile: {self.options.inner_steps} first-order SGD step(s) on the "
                        "support set; outer step towards the adapted weights")
