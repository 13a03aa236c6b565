"""End to end: Hydra config -> real Lightning training -> checkpoint -> sharebone-eval."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from helpers.configs import FAST, compose_train
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from sharebone.checkpoint_io import CheckpointError
from sharebone.regimes import load_regime
from sharebone.run import eval as sb_eval
from sharebone.run.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real training run, shared by the tests below (read-only)."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(out, FAST + ["sampler.batches_per_epoch=5", "test.episodes=20"])
    metrics = run(cfg)
    return out, cfg, metrics


def test_run_trains_checkpoints_and_scores_every_setting(trained):
    out, cfg, metrics = trained
    for name in ("best.ckpt", "last.ckpt"):
        assert (out / "checkpoints" / name).is_file()
    # It learned: every setting well above chance (1/n_way), on 20 fixed episodes.
    for setting, chance in (("5w1s", 0.2), ("5w5s", 0.2), ("20w1s", 0.05), ("20w5s", 0.05)):
        assert metrics[f"test/{setting}/acc"] > chance + 3 * metrics[f"test/{setting}/ci95"]
        assert metrics[f"test/{setting}/ci95"] > 0
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["shared"] == 111936 and saved["task_specific"] == 0
    assert [r["episodes"] for r in saved["results"]] == [20] * 4


def test_checkpoints_load_with_weights_only(trained):
    out, _, _ = trained
    raw = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert raw["sharebone"]["regime"] == "protonet"
    model = load_regime(out)
    assert model.hparams.backbone["name"] == "conv4"


def test_eval_scores_the_very_same_episodes_as_training(trained, tmp_path):
    out, _, metrics = trained
    cfg = compose_train(tmp_path, [f"ckpt={out}", "episodes=20", f"output_dir={tmp_path}"],
                        config_name="eval")
    result = sb_eval.run(cfg)
    by_setting = {r["setting"]: r["mean"] for r in result["results"]}
    for setting, acc in by_setting.items():
        assert acc == pytest.approx(metrics[f"test/{setting}/acc"], abs=1e-9)
    assert len(list(tmp_path.glob("fewshot_synthetic_images_test_seed0_20ep_*.csv"))) == 1
    sb_eval.run(cfg)  # a second evaluation keeps the first's results
    assert len(list(tmp_path.glob("fewshot_synthetic_images_test_seed0_20ep_*.json"))) == 2


def test_eval_refuses_a_checkpoint_of_another_backbone(trained, tmp_path):
    out, _, _ = trained
    cfg = compose_train(tmp_path, [f"ckpt={out}", "+backbone={name: mlp}"], config_name="eval")
    with pytest.raises(CheckpointError, match=r"trained with backbone \(name=conv4.*\(name=mlp\)"):
        sb_eval.run(cfg)


def test_weights_that_do_not_fit_the_backbone_are_refused(trained, tmp_path):
    out, _, _ = trained
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["sharebone"]["hparams"]["backbone"]["hidden"] = 32  # claims a narrower net
    bad = tmp_path / "edited.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="do not fit a protonet model"):
        load_regime(bad)


def test_truncated_or_foreign_checkpoints_are_refused(trained, tmp_path):
    out, _, _ = trained
    data = (out / "checkpoints" / "best.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="Could not read checkpoint"):
        load_regime(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a sharebone checkpoint"):
        load_regime(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_regime(tmp_path / "missing.ckpt")


def test_eval_on_an_unknown_task_lists_the_known_ones(trained, tmp_path):
    out, _, _ = trained
    with pytest.raises(ConfigCompositionException, match="(?s)omniglot_nope.*omniglot_small"):
        compose_train(tmp_path, [f"ckpt={out}", "task=omniglot_nope"], config_name="eval")


def test_eval_on_another_task_family(trained, tmp_path):
    out, _, _ = trained
    cfg = compose_train(tmp_path, [f"ckpt={out}", "task=synthetic_images", "task.family.seed=3",
                                   "episodes=5", "settings=[{n_way: 5, k_shot: 1}]"],
                        config_name="eval")
    result = sb_eval.run(cfg)
    assert [r["episodes"] for r in result["results"]] == [5]


def test_training_more_ways_than_testing(tmp_path):
    cfg = compose_train(tmp_path, FAST + ["sampler.train.n_way=20", "sampler.train.q_query=2",
                                          "test.settings=[{n_way: 5, k_shot: 1}]"])
    metrics = run(cfg)
    assert set(k for k in metrics if k.startswith("test/")) == {"test/5w1s/acc", "test/5w1s/ci95"}


def test_impossible_setting_fails_before_training_with_the_numbers(tmp_path):
    cfg = compose_train(tmp_path, FAST)
    with open_dict(cfg):
        cfg.sampler.train.n_way = 100
    with pytest.raises(ValueError, match="100-way episodes need 100 classes.*only 64"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_impossible_test_setting_fails_before_training(tmp_path):
    cfg = compose_train(tmp_path, FAST + ["test.settings=[{n_way: 30, k_shot: 1}]"])
    with pytest.raises(ValueError, match="30-way episodes need 30 classes.*'test' has only 24"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_eval_inner_steps_only_applies_to_gradient_based_regimes(trained, tmp_path):
    out, _, _ = trained
    cfg = compose_train(tmp_path, [f"ckpt={out}", "inner_steps=10"], config_name="eval")
    with pytest.raises(ValueError, match="inner_steps=10 applies to gradient-based regimes"):
        sb_eval.run(cfg)


class RecordThreads(pl.Callback):
    seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordThreads.seen.append(torch.get_num_threads())


@pytest.mark.parametrize(("threads", "expected"), [("auto", 1), (2, 2)])
def test_a_tiny_model_trains_on_one_thread_and_the_setting_is_given_back(threads, expected,
                                                                          tmp_path):
    RecordThreads.seen = []
    before = torch.get_num_threads()
    cfg = compose_train(tmp_path, ["experiment=sinusoid_maml", "logger=none", f"threads={threads}",
                                   "trainer.max_steps=2", "sampler.batches_per_epoch=2",
                                   "sampler.val_episodes=2", "test.episodes=2",
                                   f"+callbacks.threads._target_={__name__}.RecordThreads"])
    run(cfg)
    assert RecordThreads.seen == [expected, expected]
    assert torch.get_num_threads() == before
