"""Prototypical networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175)."""

from __future__ import annotations

from typing import Any

import torch

from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models import BackboneArg, ParameterSharing, count_parameters
from sharebone.models.heads import prototypes, squared_euclidean
from sharebone.regimes.base import FewShotRegime, SharingArg, register_regime

__all__ = ["ProtoNet", "prototypes", "squared_euclidean"]


@register_regime("protonet")
class ProtoNet(FewShotRegime):
    """Prototypical networks: a task's classifier is the mean embedding of each class.

    Shared: the whole backbone. Task-specific: nothing learned; the prototypes are computed
    in closed form from the support set, and a query is classified by a softmax over negative
    squared Euclidean distances to them (the paper's Eq. 1-2). The paper trains with more
    ways than it tests (e.g. 60-way training for Omniglot), set with ``sampler.train.n_way``.

    Args:
        backbone: registry spec of the embedding network, e.g. ``{"name": "conv4"}``, or a
            module of one's own (any ``x -> [batch, features]`` network).
        lr: Adam learning rate.
        lr_step_size, lr_gamma: multiply ``lr`` by ``lr_gamma`` every ``lr_step_size``
            optimizer steps (the paper halves it every 2000 episodes).
        distance: ``"sqeuclidean"`` (the paper's choice) or ``"cosine"``.

    Example:
        >>> import torch
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> model = ProtoNet({"name": "mlp", "in_features": 4, "hidden": [8]})
        >>> images = torch.randn(30, 4)
        >>> episode = EpisodeSampler(images, torch.arange(30) // 10, 3, 2, 4).batch([0, 1])
        >>> model.predict_episode(episode).shape  # [tasks, n_way * q_query, n_way]
        torch.Size([2, 12, 3])
    """

    follows_sharing_map = True

    def __init__(self, backbone: BackboneArg, lr: float = 1e-3, lr_step_size: int = 2000,
                 lr_gamma: float = 0.5, distance: str = "sqeuclidean",
                 sharing: SharingArg = None) -> None:
        super().__init__(backbone, sharing)
        if distance not in ("sqeuclidean", "cosine"):
            raise SettingError(f"distance must be 'sqeuclidean' or 'cosine', got {distance!r}.")
        self.save_hyperparameters()
        self.apply_sharing()

    def support_loss(self, support: torch.Tensor, labels: torch.Tensor,
                     n_way: int) -> torch.Tensor:
        """Test-time fine-tuning's loss: this model's own logits (its distance) on the support
        set against its own prototypes."""
        logits = self.logits(support.unsqueeze(0), support.unsqueeze(0), labels.unsqueeze(0),
                             n_way)[0]
        return torch.nn.functional.cross_entropy(logits, labels)

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        support, query = self.embed_episode(episode)
        return self.logits(support, query, episode.support_labels, episode.n_way)

    def logits(self, support: torch.Tensor, query: torch.Tensor, support_labels: torch.Tensor,
               n_way: int) -> torch.Tensor:
        """Query logits ``[T, Q, n_way]`` from support and query features and support labels."""
        centers = prototypes(support, support_labels, n_way)
        if self.hparams.distance == "cosine":
            query = torch.nn.functional.normalize(query, dim=-1)
            centers = torch.nn.functional.normalize(centers, dim=-1)
            return 10.0 * query @ centers.transpose(1, 2)
        return -squared_euclidean(query, centers)

    def parameter_sharing(self) -> ParameterSharing:
        return ParameterSharing(shared=count_parameters(self.backbone), task_specific=0,
                                description="prototypes: class means of support embeddings")

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The paper's schedule: ``lr`` times ``lr_gamma`` every ``lr_step_size`` steps."""
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step_size,
                                               gamma=self.hparams.lr_gamma)
