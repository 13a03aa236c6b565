"""Classification and regression as one object: losses, per-task scores and label shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharebone.data.multitask import SyntheticRegressionTasks
from sharebone.data.sinusoid import SinusoidTasks
from sharebone.regimes import MAML, MultiTask, ProtoNet
from sharebone.task_kind import CLASSIFICATION, REGRESSION, task_kind

MLP = {"name": "mlp", "in_features": 5, "hidden": [8]}


def test_the_loss_option_names_the_kind_and_an_unknown_one_says_what_exists():
    assert task_kind("cross_entropy") is CLASSIFICATION and task_kind("mse") is REGRESSION
    assert (CLASSIFICATION.metric_name, CLASSIFICATION.higher_is_better) == ("acc", True)
    assert (REGRESSION.metric_name, REGRESSION.higher_is_better) == ("mse", False)
    with pytest.raises(ValueError, match=r"loss must be one of \('cross_entropy', 'mse'\), "
                                         "got 'l1'"):
        task_kind("l1")


def test_classification_loss_and_accuracy_per_task():
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(CLASSIFICATION.loss(logits, labels),
                               F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    want = (logits.argmax(-1) == labels).float().mean(-1)
    torch.testing.assert_close(CLASSIFICATION.metric(logits, labels), want)
    with pytest.raises(ValueError, match="logits' shape without the class dimension"):
        CLASSIFICATION.loss(logits, labels[:, :3])


def test_regression_targets_never_broadcast_against_predictions():
    predictions = torch.randn(3, 4, 1)
    targets = torch.randn(3, 4, 1)
    want = (predictions - targets).pow(2)
    torch.testing.assert_close(REGRESSION.loss(predictions, targets), want.mean())
    torch.testing.assert_close(REGRESSION.metric(predictions, targets), want.mean((1, 2)))
    # One number per example without the output dimension reads the same (plain batches).
    torch.testing.assert_close(REGRESSION.loss(predictions, targets.squeeze(-1)), want.mean())
    for bad in (torch.randn(3, 4, 4), torch.randn(3, 1), torch.randn(4, 1)):
        with pytest.raises(ValueError, match="Regression targets must have the predictions'"):
            REGRESSION.loss(predictions, bad)


@pytest.mark.parametrize("family", [SinusoidTasks(), SyntheticRegressionTasks(input_dim=1)])
def test_regression_episodes_hold_labels_shaped_like_the_predictions(family):
    episode = family.sampler("val", 1, 5, 7, seed=0).batch(range(3))
    assert episode.support_labels.shape == (3, 5, 1) and episode.query_labels.shape == (3, 7, 1)


def test_every_regime_takes_its_metric_from_its_task_kind():
    regression = [MAML(MLP, n_way=1, loss="mse"), MultiTask(MLP, heads={"a": 1}, loss="mse")]
    classification = [MAML(MLP, n_way=3), MultiTask(MLP, heads={"a": 3}), ProtoNet(MLP)]
    for model in regression:
        assert model.task_kind is REGRESSION and model.metric_name == "mse"
        assert not model.metric_higher_is_better
    for model in classification:
        assert model.task_kind is CLASSIFICATION and model.metric_name == "acc"
        assert model.metric_higher_is_better
    with pytest.raises(ValueError, match="loss must be one of"):
        MultiTask(MLP, loss="hinge")


def test_a_multitask_backbone_scores_regression_episodes_with_a_ridge_head():
    model = MultiTask(MLP, heads={"a": 1}, loss="mse").eval()
    episode = SyntheticRegressionTasks(input_dim=5).sampler("test", 1, 10, 6, seed=0).batch(
        range(4))
    loss, predictions = model.episode_loss(episode)
    assert predictions.shape == episode.query_labels.shape == (4, 6, 1)
    torch.testing.assert_close(loss, (predictions - episode.query_labels).pow(2).mean())
    assert model.episode_metric(predictions, episode.query_labels).shape == (4,)
