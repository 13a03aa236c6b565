"""Multitask's per-task branches: hard parameter sharing at a chosen depth (sharing.branch_at,
sharing.task), trained through sharebone-train on generated image tasks."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.errors import SettingError
from sharebone.regimes import create_regime, load_regime

CONV = {"name": "conv4", "in_channels": 1, "image_size": 28, "hidden": 8}
GROUPS = [*FAST, "regime=multitask", "backbone.hidden=8", "task.family.name=synthetic_image_groups",
          "+task.family.num_tasks=3", "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]"]


def test_branch_at_copies_the_blocks_after_it_per_task():
    model = create_regime("multitask", backbone=CONV, heads={"a": 3, "b": 4},
                          sharing={"branch_at": "blocks.2"})
    copied = [n for n, r in model.sharing_roles.items() if r == "task"]
    assert copied and all(n.startswith("backbone.blocks.3.") for n in copied)
    own = dict(model.named_parameters())
    assert not any(own[n].requires_grad for n in copied)  # the template copies start from
    assert all(own[n].requires_grad for n, r in model.sharing_roles.items() if r == "shared")
    per_task = sum(own[n].numel() for n in copied)
    counts = model.parameter_sharing()
    assert counts.task_specific == sum(p.numel() for p in model.heads.parameters()) + 2 * per_task
    images = torch.rand(6, 1, 28, 28)
    assert model.features(images).shape == (6, 2 * model.backbone.num_features)


def test_a_task_trains_its_own_branch_and_the_trunk_is_shared(tmp_path):
    from sharebone.run.train import run

    out = tmp_path / "run"
    metrics = run(compose_train(out, [*GROUPS, "sharing.branch_at=blocks.2"]))
    assert "test/5w1s/acc" in metrics
    model = load_regime(out / "checkpoints" / "last.ckpt")
    assert model.branches is not None and len(model.branches.tasks) == 3
    first, second = (model.branches.parameters_of(t) for t in model.branches.tasks[:2])
    moved = [n for n in first if not torch.equal(first[n], second[n])]
    assert moved  # each task's copy trained on its own task
    template = dict(model.backbone.named_parameters())
    assert all(not torch.equal(first[n], template[n]) for n in moved)


def test_a_task_pattern_gives_per_task_copies_too():
    model = create_regime("multitask", backbone=CONV, heads={"a": 3, "b": 4},
                          sharing={"task": ["norm"]})
    assert model.branches is not None
    assert all(".1." in n for n in model.branches.names)  # conv4's norms: blocks.<i>.1


@pytest.mark.parametrize(("regime", "sharing", "message"), [
    ("multitask", {"branch_at": "blocks.9"},
     r"sharing.branch_at='blocks.9': the backbone has no such block; branch after one of "
     r"blocks.0, blocks.1, blocks.2, or branch_at=head"),
    ("multitask", {"branch_at": "blocks.3"}, r"nothing of the backbone comes after it"),
    ("multitask", {"branch_at": "blocks.2", "adapt": ["backbone.blocks.0.*"]},
     r"a new task has no branch"),
    ("multitask", {"branch_at": "blocks.2", "adapt": ["norm"]}, r"also selected by sharing.adapt"),
    ("protonet", {"branch_at": "blocks.2"}, r"sharing.branch_at: protonet makes a task's part "
                                            r"itself .* regime=multitask"),
    ("pretrain", {"task": ["norm"]}, r"sharing.task: pretrain makes a task's part itself"),
])
def test_bad_branches_are_refused_naming_the_key(regime, sharing, message):
    extra = {"heads": {"a": 3}} if regime == "multitask" else {}
    with pytest.raises(SettingError, match=message):
        create_regime(regime, backbone=CONV, sharing=sharing, **extra)


def test_branch_at_head_shares_the_whole_backbone():
    model = create_regime("multitask", backbone=CONV, heads={"a": 3},
                          sharing={"branch_at": "head"})
    assert model.branches is None
