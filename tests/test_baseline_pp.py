"""Baseline and Baseline++ (Chen et al. 2019): pre-training with a linear or a cosine
classifier with a learned scale, then a fresh head of the same kind on each support set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import FAST, compose_train

from sharebone.errors import SettingError, user_error
from sharebone.models.heads import CosineClassifier, fit_linear_classifier
from sharebone.regimes import Pretrain, load_regime
from sharebone.run.build import build_run
from sharebone.run.train import run

TINY_MLP = {"name": "mlp", "in_features": 4, "hidden": [8]}


def test_the_cosine_classifier_is_a_scaled_cosine_similarity_with_a_learned_scale():
    torch.manual_seed(0)
    head = CosineClassifier(6, 4, scale=5.0)
    x = torch.randn(3, 6)
    expected = 5.0 * F.cosine_similarity(x.unsqueeze(1), head.weight.unsqueeze(0), dim=-1)
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(head(7.0 * x), head(x))  # the features' norm plays no part
    head(x).logsumexp(-1).sum().backward()
    assert head.scale.grad is not None and head.scale.grad != 0


def test_a_fresh_cosine_head_fits_the_support_set_with_the_given_scale():
    torch.manual_seed(0)
    centers = torch.randn(3, 8)
    support = (centers.repeat_interleave(4, 0) + 0.1 * torch.randn(12, 8)).unsqueeze(0)
    labels = torch.arange(3).repeat_interleave(4).unsqueeze(0)
    head = fit_linear_classifier(support, labels, 3, steps=50, cosine_scale=torch.tensor(10.0))
    logits = head(support)
    assert (logits.argmax(-1) == labels).all()
    assert logits.abs().max() <= 10.0 + 1e-5 and head.cosine_scale == 10.0
    cos = F.cosine_similarity(support[0].unsqueeze(1), head.weight[0].unsqueeze(0), dim=-1)
    torch.testing.assert_close(logits[0], 10.0 * cos)


def test_sharebone_train_pretrains_baseline_pp_and_scores_above_chance(tmp_path):
    metrics = run(compose_train(tmp_path, [
        *FAST, "backbone=mlp", "regime=pretrain", "regime.classifier=cosine",
        "test.episodes=8", "test.settings=[{n_way: 5, k_shot: 5}]", "figures.enabled=false"]))
    assert metrics["test/5w5s/acc"] > 0.2 + 3 * metrics["test/5w5s/ci95"]
    model = load_regime(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, Pretrain) and model.hparams.classifier == "cosine"
    head = model.heads["classes"]
    assert isinstance(head, CosineClassifier) and head.out_features == 64
    assert head.scale.item() != 10.0  # learned
    sharing = model.parameter_sharing()
    assert sharing.task_specific == 64 * 64 + 1 and "Baseline++" in sharing.description


def test_baseline_keeps_its_linear_classifier():
    model = Pretrain(TINY_MLP, num_classes=5)
    assert isinstance(model.heads["classes"], torch.nn.Linear)
    assert model.hparams.classifier == "linear"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"classifier": "cosine", "scale": 0.0}, r"regime\.scale must be > 0"),
    ({"classifier": "cosine", "scale": -2.0}, r"regime\.scale must be > 0"),
    ({"classifier": "linear", "scale": 0.0}, r"regime\.scale must be > 0"),
    ({"classifier": "cosin"}, r"regime\.classifier must be one of \('linear', 'cosine'\)"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs, match):
    with pytest.raises(SettingError, match=match):
        Pretrain(TINY_MLP, num_classes=5, **kwargs)


def test_a_bad_scale_from_the_command_line_names_the_key(tmp_path):
    with pytest.raises(Exception) as err:
        build_run(compose_train(tmp_path, [*FAST, "backbone=mlp", "regime=pretrain",
                                           "regime.classifier=cosine", "regime.scale=0"]))
    assert str(user_error(err.value)).startswith("regime.scale must be > 0")
