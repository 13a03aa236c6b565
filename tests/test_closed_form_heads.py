"""R2D2 and MetaOptNet's ridge head: the closed form equals a direct solve of the primal
problem, gradients reach everything meta-learned, a real run, and what is refused."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.data.episodes import EpisodeSampler
from sharebone.errors import SettingError, user_error
from sharebone.models.ridge import RidgeHead, ridge_weights
from sharebone.regimes import R2D2, load_regime
from sharebone.run.build import build_run
from sharebone.run.train import run

TINY_MLP = {"name": "mlp", "in_features": 6, "hidden": [8]}


def primal_solve(x, y, lam):
    """argmin ||X W - Y||^2 + lam ||W||^2, straight from its normal equations."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return torch.linalg.solve(x.transpose(-1, -2) @ x + lam * eye, x.transpose(-1, -2) @ y)


@pytest.mark.parametrize(("samples", "dim"), [(5, 64), (25, 64), (80, 16)])
def test_the_woodbury_form_equals_a_direct_solve_of_the_primal_problem(samples, dim):
    g = torch.Generator().manual_seed(samples)
    x = torch.randn(3, samples, dim, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.arange(samples) % 5, 5).to(x.dtype).expand(3, -1, -1)
    expected = primal_solve(x, y, 0.7)
    for form in ("dual", "primal", "auto"):
        torch.testing.assert_close(ridge_weights(x, y, 0.7, form=form), expected,
                                   rtol=1e-10, atol=1e-12)
    # the solution is a stationary point: X^T (X W - Y) + lam W = 0
    w = ridge_weights(x, y, 0.7)
    residual = x.transpose(-1, -2) @ (x @ w - y) + 0.7 * w
    assert residual.abs().max() < 1e-10


@pytest.mark.parametrize("head", ["r2d2", "ridge"])
def test_the_head_scores_queries_with_its_scale_bias_and_lambda(head):
    torch.manual_seed(0)
    model = RidgeHead(head, scale=3.0).double()
    support, query = torch.randn(2, 10, 16).double(), torch.randn(2, 7, 16).double()
    labels = (torch.arange(10) % 5).expand(2, -1)
    lam = 1.0 if head == "r2d2" else 50.0
    w = primal_solve(support, torch.nn.functional.one_hot(labels, 5).double(), lam)
    logits = model(support, labels, query, 5)
    torch.testing.assert_close(logits, 3.0 * query @ w, rtol=1e-10, atol=1e-12)
    learned = {n for n, p in model.named_parameters()}
    assert learned == ({"log_lam", "scale", "bias"} if head == "r2d2" else {"scale"})


def test_the_meta_gradient_reaches_the_backbone_through_the_solve():
    torch.manual_seed(0)
    model = R2D2(TINY_MLP, n_way=3)
    sampler = EpisodeSampler(torch.randn(40, 6), torch.arange(40) // 8, 3, 2, 3)
    loss, _ = model.episode_loss(sampler.batch(range(2)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_ridge_head_asked_for_more_ways_than_it_was_built_for_is_refused():
    model = R2D2(TINY_MLP, n_way=3, max_way=3)
    sampler = EpisodeSampler(torch.randn(40, 6), torch.arange(40) // 8, 5, 1, 1)
    with pytest.raises(SettingError, match=r"built for at most 3 ways \(regime\.max_way=3\) "
                                           r"and was asked for 5\. Fix: set regime\.max_way=5"):
        model.predict_episode(sampler.batch([0]))
    assert R2D2(TINY_MLP).predict_episode(sampler.batch([0])).shape == (1, 5, 5)  # null: any


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": 0.0}, r"regime\.lam must be > 0"), ({"lam": -1.0}, r"regime\.lam must be > 0"),
    ({"scale": 0.0}, r"regime\.scale must be > 0"), ({"head": "svm"}, r"regime\.head must be"),
    ({"max_way": 1}, r"regime\.max_way must be an integer >= 2"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs, match):
    with pytest.raises(SettingError, match=match):
        R2D2(TINY_MLP, **kwargs)


@pytest.mark.parametrize("head", ["r2d2", "ridge"])
def test_sharebone_train_runs_r2d2_and_reloads(head, tmp_path):
    metrics = run(compose_train(tmp_path, [
        *FAST, "regime=r2d2", f"regime.head={head}", "backbone=mlp", "test.episodes=4",
        "test.settings=[{n_way: 5, k_shot: 1}, {n_way: 20, k_shot: 1}]",
        "figures.enabled=false"]))
    assert 0.0 <= metrics["test/20w1s/acc"] <= 1.0  # any n_way at test
    model = load_regime(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, R2D2) and model.hparams.head == head
    sharing = model.parameter_sharing()
    assert sharing.task_specific == 64 * 5 and sharing.meta == (3 if head == "r2d2" else 1)
    assert [p for p in tmp_path.rglob("*.json") if "task_specific" in p.read_text()]


def test_r2d2_refuses_a_sharing_map(tmp_path):
    with pytest.raises(SettingError, match=r"sharing\.adapt: regime 'r2d2' has no way"):
        build_run(compose_train(tmp_path, [*FAST, "regime=r2d2", "sharing=head"]))


def test_a_bad_lambda_from_the_command_line_names_the_key(tmp_path):
    with pytest.raises(Exception) as err:
        build_run(compose_train(tmp_path, [*FAST, "regime=r2d2", "regime.lam=-2"]))
    assert str(user_error(err.value)).startswith("regime.lam must be > 0")


def test_a_regression_task_is_refused_with_the_fix():
    episode = EpisodeSampler(torch.randn(40, 6), torch.arange(40) // 8, 3, 2, 3).batch([0])
    episode = type(episode)(episode.support, episode.support_labels.float().unsqueeze(-1),
                            episode.query, episode.query_labels.float().unsqueeze(-1),
                            episode.classes)
    with pytest.raises(SettingError, match=r"regime=r2d2 classifies .* Fix: a classification"):
        R2D2(TINY_MLP).predict_episode(episode)
