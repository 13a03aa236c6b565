"""Multitask regime: hard sharing x weighting, task families, bad input, a real training run."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers.configs import compose_train
from omegaconf import OmegaConf, open_dict

from sharebone.data.episodes import EpisodeSampler
from sharebone.data.multitask import (
    OmniglotAlphabets,
    SyntheticRegressionTasks,
    TaskBatches,
    TaskSet,
    class_tasks,
    held_out_split,
)
from sharebone.data.tasks import SyntheticImageTasks
from sharebone.models.heads import fit_linear_classifier
from sharebone.regimes import load_regime
from sharebone.regimes.multitask import MultiTask, NonFiniteWeightError
from sharebone.regimes.weighting import WEIGHTINGS
from sharebone.run.build import build_run
from sharebone.run.train import run

MLP = {"name": "mlp", "in_features": 4, "hidden": [8]}


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(9, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 0, 1, 1, 0]),
            torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))


def model_with(weighting: str, **kwargs) -> MultiTask:
    torch.manual_seed(0)
    return MultiTask(MLP, heads={"a": 3, "b": 2, "c": 2}, weighting={"name": weighting},
                     **kwargs)


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_every_weighting_trains_backbone_and_every_head(weighting):
    model = model_with(weighting)
    model.training_step(batch(), 0).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(bool(p.grad.abs().sum() > 0) for p in model.backbone.parameters())


def task_gradients(model: MultiTask) -> list[list[torch.Tensor]]:
    """Each task's own loss gradient on the backbone, computed directly."""
    inputs, targets, task = batch()
    grads = []
    for t, name in enumerate(model.head_names):
        model.zero_grad()
        rows = task == t
        out = model.heads[name](model.backbone(inputs)[rows])
        torch.nn.functional.cross_entropy(out, targets[rows]).backward()
        grads.append([p.grad.clone() for p in model.backbone.parameters()])
    model.zero_grad()
    return grads


def test_an_aggregation_weighs_the_backbone_gradient_and_leaves_heads_their_own():
    model = model_with("mgda", conflict_every=0)
    per_task = task_gradients(model)
    inputs, targets, task = batch()
    losses = []
    features = model.backbone(inputs)
    for t, name in enumerate(model.head_names):
        rows = task == t
        losses.append(torch.nn.functional.cross_entropy(model.heads[name](features[rows]),
                                                        targets[rows]))
    weights = model.weighting(torch.stack(losses), model.task_gramian(torch.stack(losses)))
    model.zero_grad()
    model.training_step(batch(), 0).backward()
    for i, p in enumerate(model.backbone.parameters()):
        expected = sum(w * g[i] for w, g in zip(weights, per_task, strict=True))
        assert torch.allclose(p.grad, expected, atol=1e-5)
    # Each head: the plain gradient of its own task's loss (MGDA's weights sum to 1, so a
    # weighted head would be visibly smaller).
    rows = task == 0
    head = model.heads["a"]
    own = torch.autograd.grad(torch.nn.functional.cross_entropy(
        head(model.backbone(inputs)[rows]), targets[rows]), head.weight)[0]
    assert torch.allclose(head.weight.grad, own, atol=1e-6)


def test_equal_weighting_is_the_plain_sum_of_task_losses():
    model = model_with("equal")
    loss = model.training_step(batch(), 0)
    inputs, targets, task = batch()
    features = model.backbone(inputs)
    total = sum(torch.nn.functional.cross_entropy(model.heads[n](features[task == t]),
                                                  targets[task == t])
                for t, n in enumerate(model.head_names))
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)


def test_weights_that_go_non_finite_raise_naming_the_task():
    model = model_with("uncertainty")
    with torch.no_grad():
        model.weighting.log_variance[1] = -float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"weight for task\(s\) b=inf"):
        model.training_step(batch(), 0)


def test_a_non_finite_loss_names_the_task():
    model = model_with("equal")
    inputs, targets, task = batch()
    inputs[task == 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"loss for task\(s\) c=nan"):
        model.training_step((inputs, targets, task), 0)


def test_unknown_weighting_fails_at_construction():
    with pytest.raises(KeyError, match="Unknown weighting 'sum_of_squares'"):
        MultiTask(MLP, heads={"a": 2}, weighting={"name": "sum_of_squares"})
    with pytest.raises(KeyError, match="Unknown weighting"):
        MultiTask(MLP, weighting={"name": "sum_of_squares"})  # even before heads are known


def test_parameter_sharing_counts_backbone_heads_and_learned_weights():
    sharing = model_with("uncertainty").parameter_sharing()
    assert sharing.shared == 4 * 8 + 8
    assert sharing.task_specific == (8 * 3 + 3) + 2 * (8 * 2 + 2)
    assert sharing.meta == 3  # one log-variance per task


def test_fitted_head_separates_an_easy_episode():
    images = torch.eye(4).repeat_interleave(10, 0) + 0.05 * torch.randn(40, 4)
    episode = EpisodeSampler(images, torch.arange(40) // 10, 4, 2, 5).batch([0, 1, 2])
    for method in ("logistic", "sgd"):
        head = fit_linear_classifier(episode.support, episode.support_labels, 4, method=method,
                                     steps=50, lr=5.0)
        accuracy = (head(episode.query).argmax(-1) == episode.query_labels).float().mean()
        assert accuracy.item() == 1.0, method


def test_predict_episode_fits_under_no_grad():
    model = model_with("equal").eval()
    images = torch.randn(30, 4)
    episode = EpisodeSampler(images, torch.arange(30) // 10, 3, 2, 4).batch([0, 1])
    with torch.no_grad():
        logits = model.predict_episode(episode)
    assert logits.shape == (2, 12, 3)


# -- task families ------------------------------------------------------------------------------


def test_synthetic_regression_relatedness_sets_how_much_tasks_share():
    same = SyntheticRegressionTasks(num_tasks=3, relatedness=1.0)
    apart = SyntheticRegressionTasks(num_tasks=3, relatedness=0.0)
    assert torch.allclose(same.mix[0], same.mix[1]) and torch.allclose(same.mix[0], same.shared)
    cos = torch.nn.functional.cosine_similarity(apart.mix[0].flatten(), apart.mix[1].flatten(), 0)
    assert abs(cos.item()) < 0.5
    with pytest.raises(ValueError, match="relatedness must be in"):
        SyntheticRegressionTasks(relatedness=1.5)


def test_synthetic_regression_episodes_are_addressable():
    family = SyntheticRegressionTasks()
    sampler = family.sampler("test", 1, 5, 10, seed=3)
    a, b = sampler.batch([4, 7]), sampler.batch([7])
    assert torch.equal(a.query[1], b.query[0]) and a.support.shape == (2, 5, 16)
    assert not torch.equal(sampler.batch([0]).support, family.sampler("val", 1, 5, 10, 3)
                           .batch([0]).support)


def test_task_batches_are_balanced_and_a_pure_function_of_the_index():
    data = SyntheticRegressionTasks(num_tasks=3).tasks("train")
    batches = TaskBatches(data, per_task=5, length=10, seed=1)
    inputs, targets, task = batches[4]
    assert torch.bincount(task).tolist() == [5, 5, 5]
    assert torch.equal(batches[4][0], inputs) and not torch.equal(batches[5][0], inputs)


def test_class_tasks_and_held_out_split():
    family = SyntheticImageTasks({"train": 6}, images_per_class=5)
    data = class_tasks(family, "train")
    assert data.heads == {"classes": 6} and len(data.targets) == 30
    train, held = held_out_split(data, 2)
    assert torch.bincount(train.targets).tolist() == [2] * 6
    assert torch.bincount(held.targets).tolist() == [3] * 6
    with pytest.raises(ValueError, match="leaves no held-out example"):
        held_out_split(data, 5)


def test_omniglot_alphabets_are_tasks(real_data_dir, tmp_path):
    cfg = compose_train(tmp_path, ["task=omniglot_alphabets", f"data_dir={real_data_dir}"])
    family = OmegaConf.to_container(cfg.task.family, resolve=True)
    family.pop("name")
    data = OmniglotAlphabets(**family).tasks("train")
    assert data.heads == {"Balinese": 96, "Greek": 96, "Latin": 104, "Japanese_(katakana)": 188}
    for t, n in enumerate(data.outputs):
        assert int(data.targets[data.task == t].max()) == n - 1


# -- through sharebone-train --------------------------------------------------------------------

REGRESSION = ["task=synthetic_regression", "backbone=mlp", "regime=multitask",
              "regime.loss=mse", "debug=fast", "test.settings=[{n_way: 1, k_shot: 10}]"]


def test_a_task_with_no_head_configured_is_refused_before_training(tmp_path):
    cfg = compose_train(tmp_path, REGRESSION + ["logger=none",
                                                "+regime.heads={task0: 1, task1: 1}"])
    with pytest.raises(ValueError, match=r"Task\(s\) \['task2', 'task3', 'task4', 'task5'\] "
                                         "have no head configured"):
        build_run(cfg)


def test_multitask_regression_trains_logs_per_task_and_reloads(tmp_path):
    cfg = compose_train(tmp_path, REGRESSION + ["regime.weighting.name=pcgrad",
                                                "regime.conflict_every=1"])
    metrics = run(cfg)
    assert metrics["test/1w10s/mse"] > 0
    model = load_regime(tmp_path)  # weights_only=True inside
    assert model.hparams.heads == {f"task{t}": 1 for t in range(6)}
    assert model.metric_name == "mse"
    with open(tmp_path / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    for key in ("loss", "mse", "weight", "conflict"):
        assert f"train/task3/{key}" in columns
    assert "train/conflict" in columns and "val/mse" in columns


def test_multitask_refuses_a_family_without_tasks(tmp_path):
    cfg = compose_train(tmp_path, ["task=synthetic_images", "regime=multitask", "debug=fast"])
    with open_dict(cfg):
        cfg.logger = {}
    with pytest.raises(ValueError, match="does not split its training data into tasks"):
        run(cfg)


def test_taskset_rejects_unsorted_tasks():
    with pytest.raises(ValueError, match="sorted by task"):
        TaskSet(torch.zeros(2, 1), torch.zeros(2), torch.tensor([1, 0]), ["a", "b"], [1, 1])
