"""Hostile and careless runs (issue 9): nothing is lost, nothing silently wrong, and every
impossible setting is refused before training, naming its key."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.configs import FAST, compose_train
from omegaconf import open_dict

from sharebone.callbacks.guards import NonFiniteLossError
from sharebone.checkpoint_io import CheckpointError
from sharebone.evaluation.report import write_results
from sharebone.evaluation.stats import FewShotResult
from sharebone.run import eval as sb_eval
from sharebone.run.build import build_run, check_meta_batch_memory
from sharebone.run.run_dir import RunDirError, RunLock, restore_overrides
from sharebone.run.train import run

ONE = ["test.settings=[{n_way: 5, k_shot: 1}]", "test.episodes=2"]


class PoisonWeights(pl.Callback):
    """From optimizer step ``at`` on, the backbone's weights are NaN: the loss goes NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                for p in pl_module.backbone.parameters():
                    p.fill_(math.nan)


def fails_before_training(tmp_path: Path, overrides: list[str], error: type, match: str) -> None:
    cfg = compose_train(tmp_path, FAST + ONE + overrides)
    with pytest.raises(error, match=match):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


# -- runs that must not be lost ----------------------------------------------------------------


def test_resume_under_another_task_is_refused(tiny_run, tmp_path):
    cfg = compose_train(tmp_path, FAST + ONE + [f"resume={tiny_run}", "task.family.flip=0.3"])
    with pytest.raises(RunDirError, match=r"(?s)another task.*task.family.flip: the run has "
                                          r"0.15, this command has 0.3"):
        run(cfg)


def test_resume_continues_in_the_runs_own_directory(tmp_path):
    first = tmp_path / "first"
    run(compose_train(first, FAST + ONE + ["sampler.batches_per_epoch=2"]))
    cfg = compose_train(tmp_path / "second", FAST + ONE + ["sampler.batches_per_epoch=2",
                                                           "trainer.max_epochs=2",
                                                           f"resume={first}"])
    run(cfg)
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "second" / "checkpoints").exists()


def test_a_second_training_in_a_busy_run_directory_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        fails_before_training(tmp_path, [], RunDirError,
                              rf"in use by another training \(.*\"pid\": {os.getpid()}")


def test_a_new_run_never_overwrites_a_finished_runs_checkpoints(tiny_run):
    best = tiny_run / "checkpoints" / "best.ckpt"
    before = best.read_bytes()
    cfg = compose_train(tiny_run, FAST + ONE)
    with pytest.raises(RunDirError, match="already holds another run's checkpoints"):
        run(cfg)
    assert best.read_bytes() == before


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    code = ("import sys, time; from sharebone.run.run_dir import RunLock\n"
            f"with RunLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f'"pid": {holder.pid}'), RunLock(tmp_path):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with RunLock(tmp_path):  # no stale lock after kill -9
        pass


def test_a_nan_training_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose_train(tmp_path, FAST + ONE + [
        "checkpoint.every_n_train_steps=1", "+callbacks.poison._target_=" +
        f"{__name__}.PoisonWeights", "+callbacks.poison.at=2"])
    with pytest.raises(NonFiniteLossError, match="Training loss is nan at step 2"):
        run(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not (tmp_path / "fewshot.json").exists()


def test_a_nan_checked_on_logging_steps_never_reaches_a_checkpoint(tmp_path):
    # nonfinite_check=logging is what a GPU run does: no host read of the loss per step.
    cfg = compose_train(tmp_path, FAST + ONE + [
        "nonfinite_check=logging", "sampler.batches_per_epoch=8", "trainer.log_every_n_steps=4",
        "checkpoint.every_n_train_steps=1", f"+callbacks.poison._target_={__name__}.PoisonWeights",
        "+callbacks.poison.at=2"])
    with pytest.raises(NonFiniteLossError,
                       match=r"Training loss is nan at step 2 .*\(seen at step 3: .*no checkpoint"):
        run(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2, "the save after the NaN step was refused, not written"
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_a_nan_checked_on_logging_steps_is_found_on_the_next_one(tmp_path):
    cfg = compose_train(tmp_path, FAST + ONE + [
        "nonfinite_check=logging", "sampler.batches_per_epoch=8", "trainer.log_every_n_steps=4",
        "checkpoint.every_n_train_steps=0", f"+callbacks.poison._target_={__name__}.PoisonWeights",
        "+callbacks.poison.at=1"])
    with pytest.raises(NonFiniteLossError, match=r"nan at step 1 .*\(seen at step 4: "):
        run(cfg)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_an_unknown_nonfinite_check_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["nonfinite_check=never"], ValueError,
                          r"nonfinite_check must be one of \('step', 'logging', 'auto'\)")


def test_a_nan_loss_may_be_let_through_on_request(tmp_path):
    cfg = compose_train(tmp_path, FAST + ONE + [
        "on_nonfinite_loss=warn", f"+callbacks.poison._target_={__name__}.PoisonWeights",
        "+callbacks.poison.at=1"])
    with pytest.warns(UserWarning, match="going on as on_nonfinite_loss=warn asks"):
        metrics = run(cfg)
    saved = json.loads((tmp_path / "fewshot.json").read_text())  # strict JSON, NaN refused
    assert "test/5w1s/acc" in metrics and saved["results"][0]["setting"] == "5w1s"


def test_results_with_a_nan_score_are_valid_json(tmp_path):
    nan = FewShotResult(5, 1, 15, 10, math.nan, math.nan, math.nan)
    paths = write_results([nan], tmp_path)
    document = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c))
    assert document["results"][0]["mean"] is None


# -- refused before training, with the key named ---------------------------------------------


def test_an_empty_test_query_set_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["test.q_query=0"], ValueError,
                          r"test.q_query: \(test.settings\[0\], 5w1s\) test.q_query must be "
                          r"an integer >= 1, got 0")


def test_an_empty_training_query_set_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["task.q_query=0"], ValueError,
                          r"sampler.train: q_query must be an integer >= 1, got 0")


def test_zero_test_episodes_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["test.episodes=0"], ValueError,
                          "test: episodes must be an integer >= 1, got 0")


def test_a_zero_meta_batch_is_refused_naming_the_key(tmp_path):
    fails_before_training(tmp_path, ["sampler.meta_batch_size=0"], ValueError,
                          "sampler: meta_batch_size must be an integer >= 1, got 0")


def test_a_word_for_n_way_is_refused_naming_the_key(tmp_path):
    fails_before_training(tmp_path, ["task.n_way=abc"], ValueError,
                          "sampler.train: n_way must be an integer >= 1, got 'abc'")


def test_a_meta_batch_too_big_for_memory_is_refused_before_allocating(tmp_path):
    fails_before_training(tmp_path, ["sampler.meta_batch_size=10000000"], ValueError,
                          r"meta_batch_size=10000000: one meta-batch .* GiB of float32 inputs")


def test_memory_estimate_counts_ways_shots_queries_and_image_size(tmp_path):
    parts = build_run(compose_train(tmp_path, FAST + ONE))
    one_task = 4 * 5 * (1 + 5) * 28 * 28
    check_meta_batch_memory(parts.datamodule, parts.family, available=one_task)
    with pytest.raises(ValueError, match="more than this machine's"):
        check_meta_batch_memory(parts.datamodule, parts.family, available=one_task - 1)


def test_a_meta_batch_that_does_not_split_across_ddp_ranks_is_refused_before_spawning(tmp_path):
    started = time.perf_counter()
    fails_before_training(tmp_path, ["trainer=ddp_cpu", "sampler.meta_batch_size=3"],
                          ValueError, "meta_batch_size=3 does not split evenly across 2")
    assert time.perf_counter() - started < 60  # refused, not found after spawning (44 s)


def test_an_unknown_nonfinite_action_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["on_nonfinite_loss=explode"], ValueError,
                          "on_nonfinite_loss must be one of")


def test_a_test_setting_without_k_shot_is_refused_before_training(tmp_path):
    fails_before_training(tmp_path, ["test.settings=[{n_way: 5}]"], ValueError,
                          "k_shot must be an integer >= 1, got None")


# -- resume of things that are not a run -----------------------------------------------------


def test_resume_of_a_missing_path_says_so(tmp_path):
    fails_before_training(tmp_path / "run", [f"resume={tmp_path / 'nope'}"], CheckpointError,
                          "Cannot resume: Checkpoint .*nope does not exist")


def test_resume_of_a_folder_without_checkpoints_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_before_training(tmp_path / "run", [f"resume={tmp_path / 'empty'}"], CheckpointError,
                          r"Cannot resume: No checkpoint \(\*.ckpt\) under")


def test_resume_of_a_foreign_torch_file_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    fails_before_training(tmp_path / "run", [f"resume={tmp_path / 'other.ckpt'}"],
                          CheckpointError, "not a sharebone checkpoint")


# -- evaluation --------------------------------------------------------------------------------


def eval_cfg(tmp_path: Path, *overrides: str):
    return compose_train(tmp_path, ["episodes=2", "settings=[{n_way: 5, k_shot: 1}]",
                                    *overrides], config_name="eval")


def test_eval_of_a_folder_of_runs_refuses_to_guess_and_lists_them(tiny_run, tmp_path):
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "model.ckpt").write_bytes(
            (tiny_run / "checkpoints" / "best.ckpt").read_bytes())
    with pytest.raises(CheckpointError, match=r"(?s)holds 2 checkpoints.*a/model.ckpt.*b/model"):
        sb_eval.run(eval_cfg(tmp_path, f"ckpt={tmp_path / 'runs'}"))


def test_eval_accepts_the_documented_backbone_name_for_its_own_backbone(tiny_run, tmp_path):
    result = sb_eval.run(eval_cfg(tmp_path, f"ckpt={tiny_run}", "+backbone={name: conv4}",
                                  f"output_dir={tmp_path}"))
    assert result["results"][0]["episodes"] == 2


def test_eval_that_cannot_write_its_results_says_so_before_scoring(tiny_run, tmp_path):
    (tmp_path / "blocked").write_text("a file where the results folder would be")
    started = time.perf_counter()
    with pytest.raises(PermissionError, match="Pass output_dir="):
        sb_eval.run(eval_cfg(tmp_path, f"ckpt={tiny_run}", f"output_dir={tmp_path / 'blocked'}",
                             "episodes=100000"))
    assert time.perf_counter() - started < 60  # 100,000 episodes were not scored first


def test_eval_of_zero_episodes_is_refused(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="episodes must be an integer >= 1, got 0"):
        sb_eval.run(eval_cfg(tmp_path, f"ckpt={tiny_run}", "episodes=0",
                             f"output_dir={tmp_path}"))


def test_a_checkpoint_with_settings_its_regime_does_not_take_is_refused(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["sharebone"]["hparams"]["warp_drive"] = True
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match="records settings a protonet model does not take"):
        sb_eval.run(eval_cfg(tmp_path, f"ckpt={tmp_path / 'edited.ckpt'}"))


def test_a_checkpoint_of_an_unknown_regime_is_refused(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["sharebone"]["regime"] = "telepathy"
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match="regime 'telepathy', which this sharebone does"):
        sb_eval.run(eval_cfg(tmp_path, f"ckpt={tmp_path / 'edited.ckpt'}"))


def test_eval_with_more_ways_than_test_classes_fails_before_scoring(tiny_run, tmp_path):
    cfg = eval_cfg(tmp_path, f"ckpt={tiny_run}", f"output_dir={tmp_path}")
    with open_dict(cfg):
        cfg.settings = [{"n_way": 50, "k_shot": 1}]
    with pytest.raises(ValueError, match="50-way episodes need 50 classes"):
        sb_eval.run(cfg)
    assert not list(tmp_path.glob("fewshot_*"))


def test_a_run_record_never_brings_code_back_on_resume(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- task=synthetic_images\n- +callbacks.evil._target_=os.system\n"
        "- +callbacks.evil.command=touch_me\n- hydra.run.dir=elsewhere\n")
    argv = restore_overrides(["sharebone-train", f"resume={tmp_path}", "trainer.max_epochs=2"])
    assert argv == ["sharebone-train", "task=synthetic_images", f"resume={tmp_path}",
                    "trainer.max_epochs=2"]
    assert "+callbacks.evil._target_=os.system (names code to call)" in capsys.readouterr().out
