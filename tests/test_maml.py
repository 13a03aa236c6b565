"""MAML, FOMAML, ANIL and Meta-SGD: properties of each preset, bad input, Lightning and Hydra."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.saved_tensors import max_live_saved_tensors
from helpers.training import RandomImages, fit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import sharebone.config
from sharebone.data.episodes import EpisodeSampler
from sharebone.models.heads import initial_head
from sharebone.regimes import ANIL, FOMAML, MAML, REGIMES, MetaSGD, load_regime

PRESETS = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD}
TINY_CONV = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}
TINY_MLP = {"name": "mlp", "in_features": 6, "hidden": [8]}


def conv_episode(n_way=3, k_shot=2, q_query=2, tasks=2):
    return RandomImages().sampler("train", n_way, k_shot, q_query, 0).batch(range(tasks)).to_float()


def mlp_episode(n_way=3, tasks=2):
    sampler = EpisodeSampler(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)),
                             torch.arange(40) // 8, n_way, 2, 3)
    return sampler.batch(range(tasks))


def meta_grads(model, episode):
    model.zero_grad()
    loss, _ = model.episode_loss(episode)
    loss.backward()
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", PRESETS)
def test_every_meta_parameter_gets_a_finite_meta_gradient(name):
    torch.manual_seed(0)
    model = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1)
    grads = meta_grads(model, conv_episode())
    assert grads, "no parameters"
    for k, g in grads.items():
        assert g is not None, f"{name}: no meta-gradient on {k}"
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}: bad meta-gradient on {k}"
    if name == "metasgd":
        assert any(k.startswith("step_sizes.") for k in grads)


def test_presets_are_options_of_one_class():
    for name, cls in PRESETS.items():
        model = cls(TINY_MLP, n_way=3)
        assert isinstance(model, MAML) and model.regime_name == name and REGIMES.get(name) is cls
    assert FOMAML(TINY_MLP).hparams.first_order and ANIL(TINY_MLP).hparams.adapt == "head"
    assert MetaSGD(TINY_MLP).hparams.learn_step_sizes


@pytest.mark.parametrize("name", PRESETS)
def test_zero_test_steps_give_the_unadapted_model(name):
    torch.manual_seed(0)
    model = PRESETS[name](TINY_CONV, n_way=3, test_inner_steps=0).eval()
    episode = conv_episode()
    got = model.predict_episode(episode)
    head = initial_head(model.head, 3)
    for t in range(2):
        want = F.linear(model.backbone(episode.query[t]), head["weight"], head["bias"])
        torch.testing.assert_close(got[t], want)


def test_adaptation_lowers_the_support_loss():
    torch.manual_seed(0)
    model = MAML(TINY_MLP, n_way=3, inner_lr=0.5, test_inner_steps=5).eval()
    episode = mlp_episode().task(0)
    params, _ = model.adapt_task(episode.support, episode.support_labels, 3, 5, True)
    before = model.task_loss(model.forward_with(dict(model.named_parameters()), episode.support),
                             episode.support_labels)
    after = model.task_loss(model.forward_with(params, episode.support), episode.support_labels)
    assert after < before


def test_fomaml_meta_gradient_equals_the_query_gradient_at_the_adapted_weights():
    torch.manual_seed(0)
    model = FOMAML(TINY_MLP, n_way=3, inner_lr=0.3).double()
    episode = mlp_episode(tasks=1)
    episode = type(episode)(episode.support.double(), episode.support_labels,
                            episode.query.double(), episode.query_labels, episode.classes)
    grads = meta_grads(model, episode)
    task = episode.task(0)
    adapted, _ = model.adapt_task(task.support, task.support_labels, 3, 1, first_order=True)
    at = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    ref = torch.autograd.grad(model.task_loss(model.forward_with(at, task.query),
                                              task.query_labels), list(at.values()))
    for (k, _), r in zip(at.items(), ref, strict=True):
        torch.testing.assert_close(grads[k], r)


@pytest.mark.parametrize("name", PRESETS)
def test_vmap_and_loop_agree(name):
    torch.manual_seed(0)
    loop = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, inner_steps=2, vmap=False)
    batched = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, inner_steps=2, vmap=True)
    batched.load_state_dict(loop.state_dict())
    episode = conv_episode()
    torch.testing.assert_close(batched.predict_episode(episode), loop.predict_episode(episode),
                               rtol=1e-4, atol=1e-5)
    g_loop, g_vmap = meta_grads(loop, episode), meta_grads(batched, episode)
    for k in g_loop:
        torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("head", ["learned", "zero", "proto"])
@pytest.mark.parametrize("name", PRESETS)
def test_other_n_way_at_evaluation(name, head):
    torch.manual_seed(0)
    model = PRESETS[name](TINY_MLP, n_way=5, head=head, test_inner_steps=2).eval()
    for n_way in (3, 5):
        logits = model.predict_episode(mlp_episode(n_way=n_way))
        assert logits.shape == (2, 3 * n_way, n_way) and torch.isfinite(logits).all()


def test_learned_head_at_another_n_way_starts_from_the_mean_row():
    model = MAML(TINY_MLP, n_way=5)
    head = initial_head(model.head, 7)
    assert head["weight"].shape == (7, 8)
    torch.testing.assert_close(head["weight"][3], model.head.weight.mean(0))
    torch.testing.assert_close(head["bias"], model.head.bias.mean().expand(7))


def test_zero_head_starts_at_zero_and_proto_head_gives_negative_distances():
    model = MAML(TINY_MLP, n_way=3, head="proto", test_inner_steps=0).eval()
    task = mlp_episode().task(0)
    logits = model.predict_episode(mlp_episode()).detach()[0]
    feats_s, feats_q = model.backbone(task.support), model.backbone(task.query)
    centers = torch.stack([feats_s[task.support_labels == k].mean(0) for k in range(3)])
    distances = -torch.cdist(feats_q, centers) ** 2
    torch.testing.assert_close(logits - logits[:, :1], (distances - distances[:, :1]).detach(),
                               rtol=1e-4, atol=1e-4)
    zero = MAML(TINY_MLP, n_way=3, head="zero", test_inner_steps=0).eval()
    assert torch.count_nonzero(zero.predict_episode(mlp_episode())) == 0


def test_parameter_sharing_for_each_preset():
    backbone, head = 6 * 8 + 8, 3 * (8 + 1)
    maml = MAML(TINY_MLP, n_way=3).parameter_sharing()
    assert (maml.shared, maml.task_specific, maml.meta) == (backbone + head, backbone + head, 0)
    anil = ANIL(TINY_MLP, n_way=3).parameter_sharing()
    assert (anil.shared, anil.task_specific, anil.meta) == (backbone + head, head, 0)
    msgd = MetaSGD(TINY_MLP, n_way=3).parameter_sharing()
    assert (msgd.shared, msgd.task_specific, msgd.meta) == (backbone + head,) * 3
    anil_sgd = ANIL(TINY_MLP, n_way=3, learn_step_sizes=True).parameter_sharing()
    assert anil_sgd.meta == head
    zero = ANIL(TINY_MLP, n_way=3, head="zero").parameter_sharing()
    assert (zero.shared, zero.task_specific) == (backbone, head)


def test_per_step_batch_norm_keeps_statistics_per_inner_step():
    torch.manual_seed(0)
    model = MAML(TINY_CONV, n_way=3, inner_steps=2, inner_lr=0.1, batch_norm="per_step",
                 vmap=False)
    stats = {k: v.clone() for k, v in model.per_step_bn.named_buffers()}
    assert next(iter(stats.values())).shape[0] == 3  # steps 0, 1 and the query pass
    model.train()
    meta_grads(model, conv_episode())
    for k, v in model.per_step_bn.named_buffers():
        for slot in range(3):
            assert not torch.equal(v[slot], stats[k][slot]), f"{k}[{slot}] not updated"
    model.eval()  # eval: running statistics, and more test steps than slots works
    model.hparams.test_inner_steps = 4
    assert torch.isfinite(model.predict_episode(conv_episode())).all()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"inner_lr": 0.0}, ValueError, "inner_lr must be > 0"),
    ({"inner_lr": -0.01, "learn_step_sizes": True}, ValueError, "initial value of every"),
    ({"inner_steps": 0}, ValueError, "set test_inner_steps=0"),
    ({"test_inner_steps": -1}, ValueError, "inner_steps must be an integer >= 0"),
    ({"adapt": "head", "head": "none"}, ValueError, "has none"),
    ({"adapt": "backbone"}, ValueError, "adapt must be one of"),
    ({"batch_norm": "per_step", "vmap": True}, ValueError, "cannot batch across tasks"),
    ({"head": "proto", "loss": "mse"}, ValueError, "needs loss='cross_entropy'"),
    ({"vmap": True, "per_task_backward": True}, ValueError, "needs the tasks looped"),
    ({"vmap": True, "compile": True}, ValueError, "cannot be combined with vmap=True"),
    ({"batch_norm": "per_step", "compile": True}, ValueError, "cannot be combined"),
])
def test_bad_settings_fail_with_a_clear_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        MAML(TINY_CONV, n_way=3, **kwargs)


def as_double(episode):
    return type(episode)(episode.support.double(), episode.support_labels,
                         episode.query.double(), episode.query_labels, episode.classes)


@pytest.mark.parametrize("head", ["learned", "zero"])
@pytest.mark.parametrize("name", PRESETS)
def test_per_task_backward_gives_the_meta_batch_loss_and_meta_gradient(name, head):
    episode = as_double(conv_episode(tasks=3))
    results = []
    for per_task in (False, True):
        torch.manual_seed(0)
        model = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, inner_steps=2, head=head,
                              per_task_backward=per_task).double()
        loss, predictions = model.episode_loss(episode)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        results.append((loss.detach(), predictions.detach(), grads))
    (loss, predictions, grads), (loss_pt, predictions_pt, grads_pt) = results
    torch.testing.assert_close(loss_pt, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(predictions_pt, predictions, rtol=0, atol=1e-12)
    assert [k for k, g in grads.items() if g is None] == [k for k, g in grads_pt.items()
                                                         if g is None]
    for k, g in grads.items():
        if g is not None:
            torch.testing.assert_close(grads_pt[k], g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_task", [True, False])
def test_per_task_backward_holds_one_task_graph_at_a_time(per_task):
    torch.manual_seed(0)
    model = MAML(TINY_CONV, n_way=3, inner_lr=0.1, per_task_backward=per_task)
    one, _ = max_live_saved_tensors(lambda: model.episode_loss(conv_episode(tasks=1)))
    four, (loss, _) = max_live_saved_tensors(lambda: model.episode_loss(conv_episode(tasks=4)))
    loss.backward()
    if per_task:
        assert four == one, "per-task backward should hold one task's graph, whatever T"
    else:
        assert four > 3 * one, "one backward holds every task's graph until the end"


@pytest.mark.slow  # torch.compile builds C++ kernels with inductor: minutes on 2 busy cores
def test_compiled_backbone_gives_the_eager_meta_gradient():
    episode = conv_episode()
    # maml: compiled query pass, eager support pass; with head="proto" the prototypes are
    # differentiated twice as well, so they stay eager too.
    for name, head in (("fomaml", "learned"), ("maml", "learned"), ("maml", "proto")):
        grads = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, head=head,
                                  compile=compiled)
            grads.append(meta_grads(model, episode))
        for k, g in grads[0].items():
            if g is not None:
                torch.testing.assert_close(grads[1][k], g, rtol=1e-4, atol=2e-5,
                                           msg=f"{name}/{head}: {k}")
    model.eval()
    assert torch.equal(model.predict_episode(episode).argmax(-1),
                       model.predict_episode(episode).argmax(-1))
    assert "_compiled" in vars(model) and "_compiled" not in vars(copy.deepcopy(model))


def test_zero_test_steps_are_accepted():
    assert MAML(TINY_MLP, n_way=3, test_inner_steps=0).test_inner_steps == 0


@pytest.mark.parametrize("name", PRESETS)
def test_lightning_fit_save_reload_and_predict(name, tmp_path):
    torch.manual_seed(0)
    model = PRESETS[name](TINY_CONV, n_way=3, inner_lr=0.1, test_inner_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, path = fit(model, tmp_path)
    assert trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = load_regime(path)  # weights_only=True inside
    assert type(loaded) is type(model) and loaded.test_inner_steps == 2
    episode = RandomImages().sampler("test", 5, 1, 2, 0).batch(range(2)).to_float()
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.predict_episode(episode), model.predict_episode(episode))


@pytest.mark.slow  # as above: an inductor compile
def test_lightning_fit_with_a_compiled_backbone(tmp_path):
    torch.manual_seed(0)
    model = FOMAML(TINY_CONV, n_way=3, inner_lr=0.1, compile=True)
    trainer, path = fit(model, tmp_path)
    assert trainer.global_step == 2 and "_compiled" in vars(model)
    loaded = load_regime(path)
    assert loaded.hparams.compile
    episode = RandomImages().sampler("test", 3, 1, 2, 0).batch(range(2)).to_float()
    torch.testing.assert_close(loaded.eval().predict_episode(episode),
                               model.eval().predict_episode(episode), rtol=1e-4, atol=1e-5)


CONFIGS = ["regime=maml", "regime=fomaml", "regime=anil", "regime=metasgd",
           "experiment=omniglot_maml_5w1s", "experiment=omniglot_maml_20w1s"]


@pytest.mark.parametrize("override", CONFIGS)
def test_configs_compose_and_instantiate(override):
    with initialize_config_dir(config_dir=str(sharebone.config.CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[override, "backbone.hidden=4"],
                      return_hydra_config=True)
    model = instantiate(cfg.regime, _convert_="all")
    assert isinstance(model, MAML)
    expected = override.split("=")[1] if override.startswith("regime") else "maml"
    assert model.regime_name == expected
    assert model.hparams.n_way == cfg.sampler.train.n_way


@pytest.mark.parametrize("backend", ["torch_func", "learn2learn"])
def test_evaluation_keeps_no_graph_but_meta_training_does(backend):
    if backend == "learn2learn":
        pytest.importorskip("learn2learn", reason="learn2learn not installed; run "
                                                  "scripts/install_learn2learn.sh")
    model = MAML(TINY_MLP, n_way=3, backend=backend)
    assert model.train().predict_episode(mlp_episode()).requires_grad
    assert not model.eval().predict_episode(mlp_episode()).requires_grad


@pytest.mark.parametrize("name", PRESETS)
def test_regression_on_synthetic_regression_tasks_learns_without_broadcasting(name):
    """``loss="mse"`` on SyntheticRegressionTasks episodes: labels have the predictions' shape
    ``[T, M, 1]`` (so no ``[S, 1]`` against ``[S]`` broadcast), the loss is the query MSE, and a
    few meta-steps lower the query MSE of held-out tasks."""
    from sharebone.data.multitask import SyntheticRegressionTasks

    family = SyntheticRegressionTasks(input_dim=5, latent_dim=2)
    train, val = (family.sampler(split, 1, 10, 10, seed=0) for split in ("train", "val"))
    torch.manual_seed(0)
    model = PRESETS[name]({"name": "mlp", "in_features": 5, "hidden": [32]}, n_way=1,
                          inner_lr=0.1, loss="mse")
    held_out = val.batch(range(32))

    def query_mse():
        model.eval()
        predictions = model.predict_episode(held_out)
        assert predictions.shape == held_out.query_labels.shape == (32, 10, 1)
        return (predictions - held_out.query_labels).pow(2).mean()

    before = query_mse()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        episode = train.batch(range(4 * step, 4 * step + 4))
        loss, predictions = model.episode_loss(episode)
        assert predictions.shape == episode.query_labels.shape == (4, 10, 1)
        torch.testing.assert_close(loss, (predictions - episode.query_labels).pow(2).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert query_mse() < 0.9 * before


@pytest.mark.parametrize("name, head", [("maml", "learned"), ("metasgd", "zero"),
                                        ("anil", "learned")])
@pytest.mark.parametrize("per_task", [True, False])
def test_meta_training_at_another_n_way_than_the_head_learns_is_refused(name, head, per_task):
    model = PRESETS[name](TINY_MLP, n_way=5, head=head, per_task_backward=per_task).train()
    with pytest.raises(ValueError, match=r"Meta-training on 3-way episodes, but .* learned for "
                                         r"n_way=5.*regime.n_way.*sampler.train.n_way"):
        model.episode_loss(mlp_episode(n_way=3))
    model.eval()  # evaluation: any n_way, the head starting as head=... says
    assert model.predict_episode(mlp_episode(n_way=3)).shape == (2, 9, 3)
    with torch.no_grad():  # not meta-training either: nothing is learned
        model.train().predict_episode(mlp_episode(n_way=3))


def test_a_zero_head_without_learned_step_sizes_meta_trains_at_any_n_way():
    model = MAML(TINY_MLP, n_way=5, head="zero").train()
    loss, predictions = model.episode_loss(mlp_episode(n_way=3))
    assert predictions.shape == (2, 9, 3) and torch.isfinite(loss)


def test_options_are_read_from_hparams_and_checked_again_when_those_change():
    model = MAML(TINY_MLP, n_way=3, inner_steps=2)
    assert model.options.inner_steps == 2 and model.test_inner_steps == 2
    model.hparams.test_inner_steps = 0  # what sharebone-eval's inner_steps=... does
    assert model.options.test_steps == 0 and model.test_inner_steps == 0
    model.hparams.test_inner_steps = -1
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0"):
        model.eval().predict_episode(mlp_episode())


def test_one_place_says_which_parameters_adapt():
    backbone = {f"backbone.{k}": tuple(p.shape) for k, p in
                MAML(TINY_MLP).backbone.named_parameters()}
    head = {"head.weight": (3, 8), "head.bias": (3,)}
    assert MAML(TINY_MLP, n_way=3).adapted_shapes() == backbone | head
    assert ANIL(TINY_MLP, n_way=3).adapted_shapes() == head
    assert MAML(TINY_MLP, n_way=3, head="none").adapted_shapes() == backbone
    assert ANIL(TINY_MLP, n_way=3).adapted_shapes(n_way=7)["head.weight"] == (7, 8)
    msgd = MetaSGD(TINY_MLP, n_way=3)
    assert {k: tuple(v.shape) for k, v in msgd.step_sizes.items()} == {
        k.replace(".", "__"): s for k, s in (backbone | head).items()}
    task = mlp_episode().task(0)
    params = msgd.initial_params(task.support, task.support_labels, 3)
    assert list(params) == list(backbone | head)


def test_learn2learn_is_imported_only_by_its_backend():
    import subprocess
    import sys

    code = ("import sys, sharebone.regimes, sharebone.run.train; "
            "print('learn2learn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
