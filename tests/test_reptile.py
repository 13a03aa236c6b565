"""Reptile: the outer step is theta - phi, annealed linearly; a real sharebone-train run;
what it refuses."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.adaptation import adapt
from sharebone.data.episodes import EpisodeSampler
from sharebone.errors import SettingError
from sharebone.regimes import REGIMES, Reptile, load_regime
from sharebone.run.train import run

TINY_MLP = {"name": "mlp", "in_features": 6, "hidden": [8]}


def mlp_episode(n_way=3, tasks=3):
    sampler = EpisodeSampler(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)),
                             torch.arange(40) // 8, n_way, 2, 3)
    return sampler.batch(range(tasks))


def adapted_by_hand(model, support, labels, steps, lr):
    """phi of one task, by sharebone's inner loop on the module's own parameters."""
    params = {n: p for n, p in model.named_parameters()}

    def loss(p, step):
        return torch.nn.functional.cross_entropy(model.forward_with(p, support), labels)

    return {k: v.detach() for k, v in adapt(loss, params, steps, lr, first_order=True).items()}


def test_the_meta_gradient_is_theta_minus_the_mean_adapted_parameters():
    torch.manual_seed(0)
    model = Reptile(TINY_MLP, n_way=3, inner_steps=3, inner_lr=0.3).double()
    episode = mlp_episode()
    episode = type(episode)(*(t.double() if t.is_floating_point() else t
                              for t in episode._tensors()), index=episode.index)
    loss, predictions = model.train().episode_loss(episode)
    loss.backward()
    phis = [adapted_by_hand(model, s, y, 3, 0.3)
            for s, y in zip(episode.support, episode.support_labels, strict=True)]
    for name, p in model.named_parameters():
        expected = p.detach() - torch.stack([phi[name] for phi in phis]).mean(0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)
    # The loss is the adapted models' query loss, for the logs; nothing else is in its value.
    assert predictions.shape == (3, 9, 3) and not predictions.requires_grad
    ce = torch.nn.functional.cross_entropy(predictions.flatten(0, 1),
                                           episode.query_labels.flatten())
    torch.testing.assert_close(loss.detach(), ce)


def test_an_outer_step_of_one_moves_theta_onto_the_mean_adapted_parameters():
    torch.manual_seed(0)
    model = Reptile(TINY_MLP, n_way=3, inner_steps=2, lr=1.0)
    episode = mlp_episode(tasks=2)
    phis = [adapted_by_hand(model, s, y, 2, model.hparams.inner_lr)
            for s, y in zip(episode.support, episode.support_labels, strict=True)]
    optimizer = model.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0
    model.episode_loss(episode)[0].backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), (phis[0][name] + phis[1][name]) / 2)


def test_the_outer_step_size_anneals_linearly_to_its_final_value():
    model = Reptile(TINY_MLP, n_way=3, lr=1.0, lr_final=0.2, anneal_steps=4)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    sizes = []
    for _ in range(6):
        sizes.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert sizes == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    # outer_step=optimizer: theta - phi goes to the run's optimizer (here the default Adam)
    adam = Reptile(TINY_MLP, n_way=3, lr=1e-3, outer_step="optimizer").configure_optimizers()
    assert isinstance(adam["optimizer"], torch.optim.Adam)


def test_sharebone_train_runs_reptile_logs_its_counts_and_reloads(tmp_path):
    metrics = run(compose_train(tmp_path, [
        *FAST, "regime=reptile", "backbone=mlp", "regime.inner_steps=2", "trainer.max_steps=3",
        "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]", "figures.enabled=false"]))
    assert 0.0 <= metrics["test/5w1s/acc"] <= 1.0
    model = load_regime(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, Reptile) and REGIMES.get("reptile") is Reptile
    assert model.hparams.first_order and model.hparams.outer_step == "interpolate"
    logged = [p for p in tmp_path.rglob("*.json") if "role_adapt" in p.read_text()]
    assert logged, "the parameter counts (params/*) are in the run's results"
    # Annealed over the run's own length (trainer.max_steps=3): 1, 2/3, 1/3, then 0.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lr_schedulers"][0]["_last_lr"] == pytest.approx([0.0])
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["momentum"] == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"first_order": False}, r"regime\.first_order=false: Reptile is first order"),
    ({"learn_step_sizes": True}, r"regime\.learn_step_sizes=True does not apply to Reptile"),
    ({"checkpoint_inner_steps": True}, r"regime\.checkpoint_inner_steps=True"),
    ({"outer_step": "adam"}, r"regime\.outer_step must be one of"),
    ({"lr": 0.0}, r"regime\.lr=0\.0"),
    ({"anneal_steps": 0}, r"regime\.anneal_steps must be an integer >= 1"),
    ({"adapt": "head"}, r"regime\.adapt: Reptile moves a parameter only towards"),
    ({"sharing": {"adapt": ["head.*"]}}, r"sharing\.adapt: Reptile moves a parameter only"),
])
def test_what_reptile_cannot_do_is_refused_naming_the_key(kwargs, match):
    with pytest.raises(SettingError, match=match):
        Reptile(TINY_MLP, n_way=3, **kwargs)


def test_reptile_follows_a_sharing_map_whose_shared_part_is_frozen():
    model = Reptile(TINY_MLP, n_way=3, sharing={"adapt": ["head.*"], "frozen": ["backbone.*"]})
    model.episode_loss(mlp_episode())[0].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert set(model.adapted_shapes()) == {"head.weight", "head.bias"}


def test_reptile_is_refused_with_second_order_from_the_command_line(tmp_path):
    from sharebone.errors import user_error
    from sharebone.run.build import build_run

    with pytest.raises(Exception) as err:  # Hydra's instantiate wraps it; the CLI prints it
        build_run(compose_train(tmp_path, [*FAST, "regime=reptile", "regime.first_order=false"]))
    assert str(user_error(err.value)).startswith("regime.first_order=false: Reptile is first")


def example_update(model: Reptile, episode, outer_lr: float) -> dict[str, torch.Tensor]:
    """theta after one outer step as learn2learn's Reptile example makes it
    (examples/vision/reptile_miniimagenet.py): per task a deep copy of the network is trained
    by a torch optimizer on the support set, ``p.grad`` accumulates ``theta - phi``, is
    averaged over the meta-batch, and plain SGD steps. The example's inner optimizer is Adam
    on random minibatches; sharebone's inner loop is SGD on the whole support set, so SGD is
    used here. Nothing of sharebone's inner loop runs."""
    import copy

    from sharebone.models import create_backbone

    backbone = create_backbone(**CONV).double()
    backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    head = torch.nn.Linear(model.backbone.num_features, episode.n_way).double()
    head.load_state_dict({"weight": model.head.weight, "bias": model.head.bias})
    net = torch.nn.Sequential(backbone, head)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    for t in range(episode.num_tasks):
        learner = copy.deepcopy(net)
        inner = torch.optim.SGD(learner.parameters(), lr=model.hparams.inner_lr)
        for _ in range(model.hparams.inner_steps):
            inner.zero_grad()
            loss = torch.nn.functional.cross_entropy(learner(episode.support[t]),
                                                     episode.support_labels[t])
            loss.backward()
            inner.step()
        for p, phi in zip(net.parameters(), learner.parameters(), strict=True):
            p.grad.add_(phi.detach(), alpha=-1.0)
    for p in net.parameters():
        p.grad.mul_(1.0 / episode.num_tasks).add_(p.detach())
    outer = torch.optim.SGD(net.parameters(), lr=outer_lr)
    outer.step()
    names = [f"backbone.{k}" for k, _ in backbone.named_parameters()] + ["head.weight",
                                                                          "head.bias"]
    return dict(zip(names, (p.detach() for p in net.parameters()), strict=True))


CONV = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}


def test_one_outer_step_equals_learn2learns_reptile_example_on_the_same_episode():
    from sharebone.data.episodes import Episode

    g = torch.Generator().manual_seed(0)
    n_way, k_shot, tasks = 3, 2, 2
    episode = Episode(
        support=torch.rand(tasks, n_way * k_shot, 1, 16, 16, generator=g, dtype=torch.float64),
        support_labels=torch.arange(n_way).repeat_interleave(k_shot).expand(tasks, -1),
        query=torch.rand(tasks, n_way * 2, 1, 16, 16, generator=g, dtype=torch.float64),
        query_labels=torch.arange(n_way).repeat_interleave(2).expand(tasks, -1),
        classes=torch.arange(n_way).expand(tasks, -1))
    torch.manual_seed(0)
    model = Reptile(CONV, n_way=n_way, inner_steps=3, inner_lr=0.2, lr=0.5).double()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    want = example_update(model, episode, outer_lr=0.5)
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["lr"] == 0.5  # the first step of the annealed schedule
    model.episode_loss(episode)[0].backward()
    optimizer.step()
    got = dict(model.named_parameters())
    assert set(got) == set(want)
    moved = [n for n, v in want.items() if not torch.allclose(v, before[n])]
    assert len(moved) > len(want) // 2  # (a conv bias before batch norm gets no gradient)
    for name, value in want.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-9, atol=1e-11, msg=name)
