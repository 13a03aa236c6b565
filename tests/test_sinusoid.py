"""Sinusoid regression tasks and the MAML family trained on them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.configs import compose_train
from helpers.training import fit

from sharebone.data.families import build_family
from sharebone.data.sinusoid import SinusoidTasks, uniforms
from sharebone.regimes import MAML, MetaSGD, load_regime
from sharebone.run.train import run

MLP = {"name": "mlp", "in_features": 1, "hidden": [40, 40]}


def test_uniforms_cover_zero_to_one_from_any_int64_key():
    keys = torch.tensor([0, -1, 2**63 - 1, -(2**63), 12345], dtype=torch.int64)
    u = uniforms(keys)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[1] > 0.999 and 0.49 < u[2] < 0.51


def test_episodes_are_addressable_and_follow_the_task_distribution():
    sampler = SinusoidTasks().sampler("train", n_way=1, k_shot=5, q_query=7, seed=3)
    episode = sampler.batch(range(200))
    assert episode.support.shape == (200, 5, 1) and episode.query_labels.shape == (200, 7, 1)
    assert episode.n_way == 1 and episode.num_tasks == 200 and episode.classes.shape == (200, 1)
    again = sampler.batch([17, 4])
    assert torch.equal(again.support[0], episode.support[17])
    assert torch.equal(again.query_labels[1], episode.query_labels[4])
    amplitude, phase = sampler.task_parameters(torch.arange(200))
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.std() > 1
    assert 0 <= phase.min() and phase.max() <= math.pi
    x = torch.cat([episode.support, episode.query], 1).squeeze(-1).double()
    assert -5 <= x.min() and x.max() <= 5
    y = torch.cat([episode.support_labels, episode.query_labels], 1).squeeze(-1).double()
    want = amplitude[:, None] * torch.sin(x - phase[:, None])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    other = SinusoidTasks().sampler("test", n_way=1, k_shot=5, q_query=7, seed=3).batch([0])
    assert not torch.equal(other.support[0], episode.support[0])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="n_way=1"):
        SinusoidTasks().sampler("train", n_way=5, k_shot=5, q_query=5, seed=0)
    with pytest.raises(ValueError, match="k_shot must be"):
        SinusoidTasks().sampler("train", n_way=1, k_shot=0, q_query=5, seed=0)
    with pytest.raises(ValueError, match="low <= high"):
        SinusoidTasks(amplitude=(5.0, 0.1))


def test_regression_regime_reports_mse():
    model = MAML(MLP, n_way=1, inner_lr=0.01, loss="mse")
    assert model.metric_name == "mse" and not model.metric_higher_is_better
    episode = SinusoidTasks().sampler("val", 1, 10, 10, 0).batch(range(4))
    predictions = model.predict_episode(episode)
    assert predictions.shape == (4, 10, 1)
    want = (predictions - episode.query_labels).pow(2).mean((1, 2))
    torch.testing.assert_close(model.episode_metric(predictions, episode.query_labels), want)


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_fit_on_sinusoid_lowers_the_query_mse_and_reloads(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(MLP, n_way=1, inner_lr=0.01, loss="mse", lr=1e-2, vmap=True)
    episode = SinusoidTasks().sampler("val", 1, 10, 10, 0).batch(range(50))
    model.eval()
    before = model.episode_metric(model.predict_episode(episode), episode.query_labels).mean()
    setting = {"n_way": 1, "k_shot": 10, "q_query": 10}
    model.train()
    _, path = fit(model, tmp_path, max_steps=30, family=SinusoidTasks(), setting=setting)
    model.eval()
    after = model.episode_metric(model.predict_episode(episode), episode.query_labels).mean()
    assert after < before
    loaded = load_regime(path).eval()
    assert loaded.metric_name == "mse"
    torch.testing.assert_close(loaded.predict_episode(episode), model.predict_episode(episode))


@pytest.mark.parametrize("experiment", ["sinusoid_maml", "sinusoid_metasgd"])
def test_sinusoid_experiments_run_end_to_end(experiment, tmp_path):
    cfg = compose_train(tmp_path, [
        f"experiment={experiment}", "logger=none", "trainer.max_epochs=1",
        "sampler.batches_per_epoch=3", "sampler.val_episodes=4", "test.episodes=8",
        "trainer.enable_progress_bar=false"])
    assert build_family(cfg.task.family).input_shape == (1,)
    metrics = run(cfg)
    assert set(metrics) >= {"test/1w5s/mse", "test/1w10s/mse", "test/1w20s/mse"}
    results = json.loads((tmp_path / "fewshot.json").read_text())
    assert results["regime"] == experiment.split("_")[1]
    assert all(r["metric"] == "mse" for r in results["results"])


def test_meta_sgd_protocol_varies_the_frequency_and_leaves_finns_tasks_as_they_were():
    finn = SinusoidTasks().sampler("test", 1, 5, 10, 0)
    li = SinusoidTasks(frequency=(0.8, 1.2)).sampler("test", 1, 5, 10, 0)
    episodes = torch.arange(50)
    assert torch.equal(finn.batch(episodes).query,
                       SinusoidTasks(frequency=(1.0, 1.0)).sampler("test", 1, 5, 10, 0)
                       .batch(episodes).query)
    w = li.frequency(episodes)
    assert 0.8 <= float(w.min()) < 0.85 and 1.15 < float(w.max()) <= 1.2
    amplitude, phase = li.task_parameters(episodes)
    episode = li.batch(episodes)
    x = episode.query.double().squeeze(-1)
    expected = amplitude[:, None] * torch.sin(w[:, None] * x - phase[:, None])
    assert torch.allclose(episode.query_labels.squeeze(-1).double(), expected, atol=1e-5)
