"""Parity with learn2learn: same weights, same episode -> same adapted parameters, query loss
and meta-gradients, for MAML (second order), first-order MAML, ANIL and Meta-SGD.

learn2learn is the oracle here, driven the way its own examples drive it (``clone()``,
``adapt(loss)``), on a plain copy of the backbone; nothing of sharebone's inner loop is used.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from sharebone.config import CONFIG_DIR
from sharebone.data.episodes import Episode
from sharebone.models import create_backbone
from sharebone.regimes import ANIL, FOMAML, MAML, MetaSGD

pytestmark = [
    pytest.mark.l2l,
    pytest.mark.skipif(importlib.util.find_spec("learn2learn") is None,
                       reason="learn2learn not installed; run scripts/install_learn2learn.sh"),
]

SPEC = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}
PRESETS = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "metasgd": MetaSGD}
STEPS, LR = 2, 0.3


def episode64(n_way=3, k_shot=2, q_query=3) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        support=torch.rand(1, n_way * k_shot, 1, 16, 16, generator=g, dtype=torch.float64),
        support_labels=torch.arange(n_way).repeat_interleave(k_shot).unsqueeze(0),
        query=torch.rand(1, n_way * q_query, 1, 16, 16, generator=g, dtype=torch.float64),
        query_labels=torch.arange(n_way).repeat_interleave(q_query).unsqueeze(0),
        classes=torch.arange(n_way).unsqueeze(0))


def oracle(model: MAML, episode: Episode):
    """learn2learn on an independent plain-PyTorch copy of ``model``: adapted parameters,
    query loss and meta-gradients (by sharebone parameter name)."""
    import learn2learn as l2l

    backbone = create_backbone(**SPEC).double()  # stock nn.BatchNorm2d; train mode = batch stats
    backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    head = nn.Linear(model.backbone.num_features, episode.n_way).double()
    head.load_state_dict({"weight": model.head.weight, "bias": model.head.bias})
    names = [f"backbone.{k}" for k, _ in backbone.named_parameters()] + ["head.weight", "head.bias"]
    task = episode.task(0)
    xs, ys, xq, yq = task.support, task.support_labels, task.query, task.query_labels
    hp = model.hparams
    if hp.adapt == "head":
        xs, xq = backbone(xs), backbone(xq)
        net, adapted_names = head, names[-2:]
    else:
        net, adapted_names = nn.Sequential(backbone, head), names
    if hp.learn_step_sizes:
        learner = l2l.algorithms.MetaSGD(net, lr=hp.inner_lr, first_order=hp.first_order)
    else:
        learner = l2l.algorithms.MAML(net, lr=hp.inner_lr, first_order=hp.first_order)
    clone = learner.clone()
    for _ in range(hp.inner_steps):
        clone.adapt(F.cross_entropy(clone(xs), ys))
    loss = F.cross_entropy(clone(xq), yq)
    adapted = dict(zip(adapted_names, clone.module.parameters(), strict=True))
    loss.backward()
    grads = dict(zip(names, [*backbone.parameters(), *head.parameters()], strict=True))
    grads = {k: p.grad for k, p in grads.items()}
    if hp.learn_step_sizes:
        grads.update({f"step_sizes.{k.replace('.', '__')}": lr.grad
                      for k, lr in zip(adapted_names, learner.lrs, strict=True)})
    return adapted, loss.detach(), grads


def ours(model: MAML, episode: Episode):
    task = episode.task(0)
    hp = model.hparams
    adapted, _ = model.adapt_task(task.support, task.support_labels, episode.n_way,
                                  hp.inner_steps, hp.first_order)
    model.zero_grad()
    loss, _ = model.episode_loss(episode)
    loss.backward()
    return adapted, loss.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", PRESETS)
def test_same_adapted_parameters_query_loss_and_meta_gradients(name):
    torch.manual_seed(0)
    model = PRESETS[name](SPEC, n_way=3, inner_steps=STEPS, inner_lr=LR, vmap=False).double()
    episode = episode64()
    want_adapted, want_loss, want_grads = oracle(model, episode)
    got_adapted, got_loss, got_grads = ours(model, episode)
    assert list(got_adapted) == list(want_adapted)
    for k, v in want_adapted.items():
        torch.testing.assert_close(got_adapted[k], v, rtol=1e-5, atol=1e-5, msg=k)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads)
    for k, g in want_grads.items():
        torch.testing.assert_close(got_grads[k], g, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", PRESETS)
def test_learn2learn_backend_matches_torch_func(name):
    torch.manual_seed(0)
    model = PRESETS[name](SPEC, n_way=3, inner_steps=STEPS, inner_lr=LR).double()
    episode = episode64()
    _, loss, grads = ours(model, episode)
    model.hparams.backend = "learn2learn"
    _, l2l_loss, l2l_grads = ours(model, episode)
    torch.testing.assert_close(l2l_loss, loss)
    for k, g in grads.items():
        torch.testing.assert_close(l2l_grads[k], g, msg=k)


@pytest.mark.parametrize("head", ["learned", "zero", "proto"])
def test_learn2learn_backend_evaluates_other_n_way_like_torch_func(head):
    torch.manual_seed(0)
    model = MetaSGD(SPEC, n_way=3, head=head, test_inner_steps=2, inner_lr=LR).double().eval()
    episode = episode64(n_way=5)
    want = model.predict_episode(episode)
    model.hparams.backend = "learn2learn"
    torch.testing.assert_close(model.predict_episode(episode), want)


def test_learn2learn_backend_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="needs backend='torch_func'"):
        MAML(SPEC, n_way=3, backend="learn2learn", vmap=True)
    with pytest.raises(ValueError, match="transductive"):
        MAML(SPEC, n_way=3, backend="learn2learn", batch_norm="per_step")


def subset_oracle(model: MAML, episode: Episode, preset: str):
    """learn2learn's MAML wrapped around only the part a preset adapts, the rest used as plain
    modules around it (their meta-gradient through ordinary autograd): ``last_block`` adapts
    the last conv block and the head, ``body`` (BOIL) the backbone with the head shared."""
    import learn2learn as l2l

    backbone = create_backbone(**SPEC).double()
    backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    head = nn.Linear(model.backbone.num_features, episode.n_way).double()
    head.load_state_dict({"weight": model.head.weight, "bias": model.head.bias})
    task = episode.task(0)
    xs, ys, xq, yq = task.support, task.support_labels, task.query, task.query_labels
    if preset == "last_block":
        trunk = backbone.blocks[:3]
        before, after = trunk, nn.Identity()
        adapted = nn.Sequential(backbone.blocks[3], nn.Flatten(), head)
    else:  # body
        before, after = nn.Identity(), head
        adapted = backbone
    learner = l2l.algorithms.MAML(adapted, lr=LR, first_order=False)
    clone = learner.clone()
    for _ in range(STEPS):
        clone.adapt(F.cross_entropy(after(clone(before(xs))), ys))
    loss = F.cross_entropy(after(clone(before(xq))), yq)
    loss.backward()
    names = [f"backbone.{k}" for k, _ in backbone.named_parameters()] + ["head.weight", "head.bias"]
    grads = dict(zip(names, [*backbone.parameters(), *head.parameters()], strict=True))
    return loss.detach(), {k: p.grad for k, p in grads.items()}


@pytest.mark.parametrize("preset", ["last_block", "body"])
def test_a_sharing_preset_matches_learn2learn_wrapped_around_that_part(preset):
    """learn2learn#234 asks for ``fast_params``: here learn2learn can express a subset only by
    wrapping that part of the model; the sharing map gives the same meta-gradient."""
    sharing = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "sharing" / f"{preset}.yaml"))
    torch.manual_seed(0)
    model = MAML(SPEC, n_way=3, inner_steps=STEPS, inner_lr=LR, vmap=False,
                 sharing=sharing).double()
    episode = episode64()
    want_loss, want_grads = subset_oracle(model, episode, preset)
    _, got_loss, got_grads = ours(model, episode)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for k, g in want_grads.items():
        torch.testing.assert_close(got_grads[k], g, rtol=1e-5, atol=1e-5, msg=k)
