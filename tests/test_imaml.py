"""iMAML: the implicit meta-gradient against its closed form on linear regression (float64),
shared parameters against finite differences, flat memory in inner_steps, a real
sharebone-train run, and what is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import FAST, compose_train
from helpers.training import RandomImages

from sharebone.data.episodes import Episode, EpisodeSampler
from sharebone.errors import SettingError, user_error
from sharebone.memory import PeakMemory
from sharebone.regimes import IMAML, MAML, load_regime
from sharebone.regimes.maml.imaml import conjugate_gradient
from sharebone.run.build import build_run
from sharebone.run.train import run

DIM, LAM = 4, 2.0
LINEAR = {"name": "mlp", "in_features": DIM, "hidden": []}  # the head alone: y = w.x + b
TINY_MLP = {"name": "mlp", "in_features": 6, "hidden": [8]}
TINY_CONV = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}


def regression_episode() -> Episode:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(DIM, 1, generator=g, dtype=torch.float64)
    x_s = torch.randn(1, 6, DIM, generator=g, dtype=torch.float64)
    x_q = torch.randn(1, 9, DIM, generator=g, dtype=torch.float64)
    return Episode(x_s, x_s @ w + 0.5, x_q, x_q @ w + 0.5 + 0.1 * torch.randn(1, 9, 1,
                                                                            generator=g,
                                                                            dtype=torch.float64),
                   torch.zeros(1, 1, dtype=torch.long))


def exact_implicit_gradient(model: IMAML, episode: Episode) -> torch.Tensor:
    """d L_query(phi*(theta)) / d theta with phi* the regularised problem's exact minimiser:
    the support loss is quadratic in phi = (w, b), so phi* = (H + lam I)^-1 (lam theta - g0)."""
    x_s, y_s, x_q, y_q = (t[0] for t in (episode.support, episode.support_labels,
                                         episode.query, episode.query_labels))

    def support_loss(phi):
        return F.mse_loss(x_s @ phi[:DIM, None] + phi[DIM], y_s)

    zero = torch.zeros(DIM + 1, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(support_loss, zero)
    g0 = torch.func.grad(support_loss)(zero)
    theta = torch.cat([model.head.weight.detach()[0], model.head.bias.detach()]).requires_grad_()
    phi = torch.linalg.solve(hessian + LAM * torch.eye(DIM + 1, dtype=torch.float64),
                             LAM * theta - g0)
    F.mse_loss(x_q @ phi[:DIM, None] + phi[DIM], y_q).backward()
    return theta.grad


def imaml_gradient(model: IMAML, episode: Episode) -> torch.Tensor:
    model.zero_grad()
    model.train().episode_loss(episode)[0].backward()
    return torch.cat([model.head.weight.grad[0], model.head.bias.grad])


def linear_model(inner_steps: int, cg_steps: int) -> IMAML:
    torch.manual_seed(0)
    return IMAML(LINEAR, n_way=1, loss="mse", inner_steps=inner_steps, inner_lr=0.1, lam=LAM,
                 cg_steps=cg_steps, cg_damping=0.0).double()


def test_the_meta_gradient_approaches_the_exact_implicit_gradient_of_linear_regression():
    episode = regression_episode()
    exact = exact_implicit_gradient(linear_model(1, 1), episode)
    errors = {(steps, cg): (imaml_gradient(linear_model(steps, cg), episode) - exact).norm()
              / exact.norm() for steps, cg in ((2, 5), (20, 5), (400, 1), (400, 5))}
    assert errors[(2, 5)] > errors[(20, 5)] > errors[(400, 5)]  # more inner steps: closer
    assert errors[(400, 1)] > 100 * errors[(400, 5)]            # more CG steps: closer
    assert errors[(400, 5)] < 1e-9                  # CG is exact after DIM + 1 steps
    # and the loss it reports is the query loss at the adapted parameters
    model = linear_model(400, 5)
    loss, predictions = model.train().episode_loss(episode)
    torch.testing.assert_close(loss.detach(), F.mse_loss(predictions, episode.query_labels))


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    b = [torch.randn(2, 3, generator=g, dtype=torch.float64)]  # any shapes, flattened
    x, = conjugate_gradient(lambda v: [(a @ v[0].flatten()).view(2, 3)], b, steps=6)
    torch.testing.assert_close(a @ x.flatten(), b[0].flatten())
    zero, = conjugate_gradient(lambda v: v, [torch.zeros(3)], steps=3)  # b = 0: no NaN
    assert torch.equal(zero, torch.zeros(3))


def test_shared_parameters_get_their_exact_implicit_gradient_under_a_sharing_map():
    """adapt=head (the backbone shared, not adapted): d L / d backbone, through phi*(w) too,
    equals finite differences of the loss after the (converged) inner problem."""
    torch.manual_seed(0)
    model = IMAML(TINY_MLP, n_way=3, adapt="head", inner_steps=100, test_inner_steps=100,
                  inner_lr=0.2, lam=LAM, cg_steps=27, cg_damping=0.0).double()
    sampler = EpisodeSampler(torch.randn(40, 6, dtype=torch.float64), torch.arange(40) // 8, 3,
                             2, 3)
    episode = sampler.batch([0])
    model.zero_grad()
    model.train().episode_loss(episode)[0].backward()
    weight = model.backbone.layers[0].weight
    analytic = weight.grad.clone()
    model.eval()
    for index in [(0, 0), (7, 5)]:
        with torch.no_grad():
            weight[index] += 1e-5
        up = model.episode_loss(episode)[0].item()
        with torch.no_grad():
            weight[index] -= 2e-5
        down = model.episode_loss(episode)[0].item()
        with torch.no_grad():
            weight[index] += 1e-5
        assert (up - down) / 2e-5 == pytest.approx(analytic[index].item(), rel=1e-4, abs=1e-8)


def peak_bytes(model, episode) -> int:
    model.zero_grad()
    with PeakMemory("cpu") as peak:
        model.train().episode_loss(episode)[0].backward()
    return peak.bytes


def test_memory_does_not_grow_with_inner_steps_while_maml_s_does():
    episode = RandomImages().sampler("train", 3, 1, 2, 0).batch([0]).to_float()
    imaml = [peak_bytes(IMAML(TINY_CONV, n_way=3, inner_steps=s, cg_steps=2), episode)
             for s in (1, 8)]
    maml = [peak_bytes(MAML(TINY_CONV, n_way=3, inner_steps=s), episode) for s in (1, 8)]
    assert imaml[1] <= 1.05 * imaml[0], imaml
    assert maml[1] > 1.5 * maml[0], maml


def test_sharebone_train_runs_imaml_logs_its_counts_and_reloads(tmp_path):
    metrics = run(compose_train(tmp_path, [
        *FAST, "regime=imaml", "backbone=mlp", "regime.inner_steps=2", "regime.cg_steps=2",
        "regime.test_inner_steps=2", "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]",
        "figures.enabled=false"]))
    assert 0.0 <= metrics["test/5w1s/acc"] <= 1.0
    model = load_regime(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, IMAML) and model.hparams.lam == 2.0 and model.hparams.cg_steps == 2
    assert "implicit meta-gradient" in model.parameter_sharing().description
    assert [p for p in tmp_path.rglob("*.json") if "role_adapt" in p.read_text()]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": 0.0}, r"regime\.lam must be > 0"), ({"lam": -1.0}, r"regime\.lam must be > 0"),
    ({"cg_steps": 0}, r"regime\.cg_steps must be an integer >= 1"),
    ({"cg_steps": 2.5}, r"regime\.cg_steps must be an integer >= 1"),
    ({"cg_damping": -0.1}, r"regime\.cg_damping must be >= 0"),
    ({"first_order": True}, r"regime\.first_order=True does not apply to iMAML"),
    ({"learn_step_sizes": True}, r"regime\.learn_step_sizes=True does not apply to iMAML"),
    ({"vmap_chunk_size": 2}, r"regime\.vmap_chunk_size=2 does not apply to iMAML"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs, match):
    with pytest.raises(SettingError, match=match):
        IMAML(TINY_MLP, n_way=3, **kwargs)


@pytest.mark.parametrize(("override", "start"), [("regime.lam=0", "regime.lam must be > 0"),
                                                 ("regime.cg_steps=0", "regime.cg_steps must")])
def test_bad_settings_from_the_command_line_name_the_key(override, start, tmp_path):
    with pytest.raises(Exception) as err:
        build_run(compose_train(tmp_path, [*FAST, "regime=imaml", override]))
    assert str(user_error(err.value)).startswith(start)
