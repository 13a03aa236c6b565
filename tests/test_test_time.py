"""The sharing map in the regimes without an inner loop (test-time fine-tuning of the adapt
set), adapters from the config, and test-time settings chosen on validation (``auto``)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.checkpoint_io import read_checkpoint
from sharebone.data.episodes import EpisodeSampler
from sharebone.errors import SettingError
from sharebone.evaluation import fewshot
from sharebone.models.sharing import SharingMap
from sharebone.regimes import create_regime, load_regime
from sharebone.regimes.test_time import CANDIDATES, FineTuning, finetuned_features
from sharebone.run.run_dir import restorable

CONV = {"name": "conv4", "in_channels": 1, "image_size": 28, "hidden": 8}
#: Training runs of a few seconds: a small conv4, one test setting, few episodes.
TINY = [*FAST, "backbone.hidden=8", "test.episodes=4", "test.auto_episodes=3",
        "test.settings=[{n_way: 5, k_shot: 1}]"]


def _sampler(seed: int = 0) -> EpisodeSampler:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(60, 1, 28, 28, generator=gen)
    return EpisodeSampler(images, torch.arange(60) // 6, 5, 1, 3, seed=seed)


def _episodes(tasks: int = 2, seed: int = 0):
    return _sampler(seed).batch(list(range(tasks)))


def _protonet(sharing=None, seed: int = 0):
    torch.manual_seed(seed)
    return create_regime("protonet", backbone=CONV, sharing=sharing).eval()


def test_fine_tuning_the_adapt_set_changes_predictions_but_not_the_model():
    model = _protonet({"adapt": ["last_block"], "test_steps": 5, "test_lr": 0.01})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    episode = _episodes()
    with torch.no_grad():
        tuned = model.predict_episode(episode)
    model.set_test_setting("sharing.test_steps", 0)
    with torch.no_grad():
        plain = model.predict_episode(episode)
    assert not torch.allclose(tuned, plain)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics


def test_no_steps_predicts_exactly_as_the_regime_without_a_map():
    mapped = _protonet({"adapt": ["norm"], "test_steps": 0})
    plain = _protonet(None)
    plain.load_state_dict(mapped.state_dict())
    episode = _episodes()
    with torch.no_grad():
        assert torch.equal(mapped.predict_episode(episode), plain.predict_episode(episode))


def test_fine_tuning_lowers_the_support_loss_and_each_task_starts_from_the_trained_values():
    model = _protonet({"adapt": ["backbone.*"], "test_steps": 10, "test_lr": 0.01})
    episode = model.model_input(_episodes(tasks=3))
    fine_tuning = model.test_time
    assert isinstance(fine_tuning, FineTuning) and fine_tuning.steps == 10
    untuned = FineTuning(fine_tuning.names, 0, fine_tuning.lr)

    def support_losses(ft: FineTuning) -> torch.Tensor:
        support, _ = finetuned_features(model, episode, ft)
        return torch.stack([model.support_loss(support[t], episode.support_labels[t], 5)
                            for t in range(3)])

    assert (support_losses(fine_tuning) < support_losses(untuned)).all()
    sampler = _sampler()
    together = model.predict_episode(sampler.batch([0, 1, 2]))
    alone = torch.cat([model.predict_episode(sampler.batch([t])) for t in range(3)])
    torch.testing.assert_close(together, alone)


def test_roles_count_adapters_and_frozen_parameters_get_no_gradient():
    model = _protonet({"adapt": ["*.film_gamma", "*.film_beta", "head.*"], "adapters": "film",
                       "frozen": ["backbone.blocks.0.0.*"]})
    roles = model.sharing_roles
    film = model.adapter_names
    assert film and all(roles[n] == "adapt" for n in film)  # head.* is skipped: no head here
    frozen = [n for n, r in roles.items() if r == "frozen"]
    assert frozen and all(not dict(model.named_parameters())[n].requires_grad for n in frozen)
    assert all(n.startswith("backbone.blocks.0.0.") for n in frozen)


@pytest.mark.parametrize("regime", ["pretrain", "multitask"])
def test_the_head_fitting_regimes_fine_tune_the_backbone_only(regime):
    sizes = {"heads": {"a": 5}} if regime == "multitask" else {"num_classes": 7}
    model = create_regime(regime, backbone=CONV, sharing={"adapt": ["*"]}, **sizes)
    assert any(n.startswith("heads.") for n in model.sharing_roles)
    adapted = [n for n, r in model.sharing_roles.items() if r == "adapt"]
    assert adapted and all(n.startswith("backbone.") for n in adapted)


@pytest.mark.parametrize(("sharing", "message"), [
    ({"adapt": ["norm"], "test_steps": -1}, r"sharing.test_steps must be a count >= 0 or auto"),
    ({"adapt": ["norm"], "test_steps": "soon"}, r"sharing.test_steps must be a count"),
    ({"adapt": ["norm"], "test_lr": 0}, r"sharing.test_lr .* must be a number > 0"),
    ({"adapt": ["norm"], "adapters": "films"}, r"sharing.adapters: got 'films'; give an "
                                               r"adapter kind \(film, residual, lora\)"),
    ({"adapt": ["norm"], "adapters": {"kind": "film", "rank": 4}},
     r"sharing.adapters.rank does not apply to kind 'film'"),
    ({"adapt": ["norm"], "adapters": {"kind": "lora", "rank": 0}},
     r"sharing.adapters.rank must be an integer >= 1"),
    ({"adapt": ["norm"], "test_step": 3}, r"sharing.test_step: no such key. Did you mean "
                                          r"sharing.test_steps\?"),
])
def test_bad_sharing_options_are_refused_naming_the_key(sharing, message):
    with pytest.raises(SettingError, match=message):
        SharingMap.of(sharing)


def test_a_resumed_run_keeps_its_sharing_map():
    assert restorable("sharing=film") is None
    assert restorable("sharing.adapt=[backbone.blocks.3.*,head.*]") is None
    assert restorable("sharing.test_steps=auto") is None
    assert restorable("sharing.adapt=${oc.env:HOME}") is not None


def test_auto_test_steps_are_chosen_on_validation_and_reach_sharebone_eval(tmp_path):
    from sharebone.run.train import run

    out = tmp_path / "run"
    metrics = run(compose_train(out, [*TINY, "regime=protonet", "sharing=film",
                                      "sharing.test_steps=auto"]))
    record = json.loads((out / "fewshot.json").read_text())["chosen_on_validation"]
    tried = [t["sharing.test_steps"] for t in record["tried"]]
    assert tried == list(CANDIDATES["test_steps"]) and record["episodes"] == 3
    best = max(record["tried"], key=lambda t: t["val_acc"])["sharing.test_steps"]
    assert record["chosen"] == {"sharing.test_steps": best}
    checkpoint = read_checkpoint(out / "checkpoints" / "best.ckpt")
    assert checkpoint["sharebone"]["hparams"]["sharing"]["test_steps"] == best
    assert checkpoint["sharebone"]["chosen_on_validation"]["chosen"] == record["chosen"]
    # sharebone-eval's loader: the adapters injected again, the choice used, the same score.
    model = load_regime(out / "checkpoints" / "best.ckpt")
    assert model.adapter_names and model.test_time.steps == best
    cfg = compose_train(out, TINY)
    from sharebone.data.families import build_family
    tests = fewshot.test_episodes(build_family(cfg.task.family), cfg.test.settings,
                          q_query=cfg.test.q_query, seed=cfg.test.seed)
    again = fewshot.evaluate(model, tests, episodes=cfg.test.episodes)
    assert again[0].mean == pytest.approx(metrics["test/5w1s/acc"])


def test_maml_auto_inner_steps_are_chosen_on_validation(tmp_path):
    from sharebone.run.train import run

    out = tmp_path / "run"
    run(compose_train(out, [*TINY, "regime=maml", "regime.test_inner_steps=auto"]))
    record = json.loads((out / "fewshot.json").read_text())["chosen_on_validation"]
    assert [t["regime.test_inner_steps"] for t in record["tried"]] == [0, 1, 2, 3, 5, 10, 20]
    chosen = record["chosen"]["regime.test_inner_steps"]
    assert record["at_edge"] == (["regime.test_inner_steps"] if chosen == 20 else [])
    assert load_regime(out / "checkpoints" / "best.ckpt").options.test_steps == chosen


def test_sharebone_eval_inner_steps_set_the_test_time_fine_tuning_steps():
    from sharebone.run.eval import set_inner_steps

    model = _protonet({"adapt": ["norm"], "test_steps": "auto"})
    set_inner_steps(model, 3)
    assert model.test_time.steps == 3 and model.hparams.sharing["test_steps"] == 3
    with pytest.raises(SettingError, match="sharing.test_steps must be a count >= 0"):
        set_inner_steps(model, -2)
    with pytest.raises(SettingError, match="this protonet checkpoint has neither"):
        set_inner_steps(_protonet(None), 3)
