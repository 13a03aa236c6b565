"""ProtoNet: known logits on a tiny task, the paper's distance, and a real training step."""

from __future__ import annotations

import pytest
import torch

from sharebone.data.episodes import Episode, EpisodeSampler
from sharebone.regimes import ProtoNet
from sharebone.regimes.protonet import prototypes, squared_euclidean


def test_prototypes_are_class_means():
    features = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]]])
    labels = torch.tensor([[0, 0, 1, 1]])
    assert torch.equal(prototypes(features, labels, 2), torch.tensor([[[1.0, 0.0], [0.0, 5.0]]]))


def test_known_logits_on_a_tiny_task():
    # An MLP with no layers is the identity, so the features are the inputs themselves.
    model = ProtoNet({"name": "mlp", "in_features": 2, "hidden": []})
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]]])
    query = torch.tensor([[[1.0, 1.0], [0.0, 5.0]]])
    episode = Episode(support, torch.tensor([[0, 0, 1, 1]]), query, torch.tensor([[0, 1]]),
                      torch.tensor([[0, 1]]))
    logits = model.predict_episode(episode)
    # Prototypes (1, 0) and (0, 5): -||q - c||^2.
    assert torch.allclose(logits, torch.tensor([[[-1.0, -17.0], [-26.0, 0.0]]]))


def test_squared_euclidean_matches_cdist():
    x, y = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    assert torch.allclose(squared_euclidean(x, y), torch.cdist(x, y).pow(2), atol=1e-5)


def test_training_step_reduces_loss_on_a_learnable_task():
    torch.manual_seed(0)
    model = ProtoNet({"name": "mlp", "in_features": 16, "hidden": [32]}, lr=1e-2)
    centers = torch.randn(20, 16) * 0.3
    images = centers.repeat_interleave(10, 0) + torch.randn(200, 16)
    sampler = EpisodeSampler(images, torch.arange(20).repeat_interleave(10), 5, 1, 5)
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for step in range(60):
        loss, _ = model.episode_loss(sampler.batch(range(step * 4, step * 4 + 4)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_parameter_sharing_counts_the_backbone_as_shared_and_nothing_task_specific():
    model = ProtoNet({"name": "conv4"})
    sharing = model.parameter_sharing()
    assert sharing.shared == sum(p.numel() for p in model.parameters())
    assert sharing.task_specific == 0


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance must be"):
        ProtoNet({"name": "conv4"}, distance="manhattan")
