"""Meta-learning with a differentiable closed-form head: R2D2 (Bertinetto et al., ICLR 2019,
arXiv:1805.08136) and MetaOptNet's ridge head (Lee et al., CVPR 2019, arXiv:1904.03758)."""

from __future__ import annotations

from typing import Any

import torch

from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import BackboneArg, ParameterSharing, count_parameters, feature_width
from sharebone.models.ridge import RidgeHead
from sharebone.regimes.base import FewShotRegime, register_regime


@register_regime("r2d2")
class R2D2(FewShotRegime):
    """Episodic training through a ridge-regression head solved in closed form per task.

    Per meta-batch, as ProtoNet: embed support and query, build each task's classifier from
    its support set alone, cross-entropy on the query set, backward through the solve into
    the backbone. Shared: the backbone and the head's calibration (``scale``, ``bias``,
    ``lam``; :class:`~sharebone.models.ridge.RidgeHead`). Task-specific: the ridge weights
    ``W = X^T (X X^T + lam I)^-1 Y`` (``D x n_way``), computed, not learned.

    Args:
        backbone: registry spec of the embedding network, or a module of one's own.
        head: ``"r2d2"`` (learned ``lam``, scale, bias: Bertinetto et al.) or ``"ridge"``
            (MetaOptNet's: fixed ``lam``, learned scale).
        lam, scale, max_way: see :class:`~sharebone.models.ridge.RidgeHead`.
        n_way: training ways, for the count of task-specific weights only (any ``n_way`` is
            scored unless ``max_way`` says otherwise).
        lr, lr_step_size, lr_gamma: Adam and its step decay (R2D2: halved every 2000
            episodes, as ProtoNet).

    Example:
        >>> import torch
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> model = R2D2({"name": "mlp", "in_features": 4, "hidden": [8]})
        >>> episode = EpisodeSampler(torch.randn(30, 4), torch.arange(30) // 10, 3, 2, 4).batch([0])
        >>> model.predict_episode(episode).shape
        torch.Size([1, 12, 3])
        >>> print(model.parameter_sharing())  # doctest: +ELLIPSIS
        shared=40  task-specific=40  meta=3  (r2d2 head: ridge regression ...)
    """

    def __init__(self, backbone: BackboneArg, head: str = "r2d2", lam: float | None = None,
                 scale: float = 1.0, max_way: int | None = None, n_way: int = 5,
                 lr: float = 1e-3, lr_step_size: int = 2000, lr_gamma: float = 0.5) -> None:
        super().__init__(backbone)
        if isinstance(n_way, bool) or n_way < 1:
            raise SettingError(f"regime.n_way must be >= 1, got {n_way!r}.")
        self.head = RidgeHead(head, lam=lam, scale=scale, max_way=max_way)
        self.save_hyperparameters()

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        if episode.support_labels.is_floating_point():
            raise SettingError(
                "regime=r2d2 classifies (its ridge head regresses one-hot class labels); this "
                "task has real-valued targets. Fix: a classification task, or a regime with "
                "loss=mse for regression (e.g. regime=maml regime.loss=mse).")
        support, query = self.embed_episode(episode)
        return self.head(support, episode.support_labels, query, episode.n_way)

    def parameter_sharing(self) -> ParameterSharing:
        width = feature_width(self.backbone)
        return ParameterSharing(
            shared=count_parameters(self.backbone), task_specific=width * self.hparams.n_way,
            meta=count_parameters(self.head),
            description=f"{self.hparams.head} head: ridge regression on the support set in "
                        "closed form (Woodbury), meta-learned scale"
                        + (", bias and lambda" if self.hparams.head == "r2d2" else ""))

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step_size,
                                               gamma=self.hparams.lr_gamma)
