"""The configs lightning-hydra-template users expect: callbacks/ presets, hparams_search/,
an optional git-ignored local/ config, top-level tags, train/test switches, TensorBoard, and
"did you mean" for mistyped overrides. Composed from the real configs, run for real."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.configs import FAST, REPO_ROOT, compose_train, hydra_context
from hydra.core.plugins import Plugins
from pytorch_lightning.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from pytorch_lightning.callbacks.progress import ProgressBar

import sharebone.run.cli
import sharebone.run.train
from sharebone.callbacks.progress import LineProgressBar, TrainMetricsShown, progress_bar
from sharebone.run.build import build_run
from sharebone.run.run_dir import RunDirError
from sharebone.run.suggest import hints
from sharebone.run.train import build_callbacks, check_objective, run

BIN = Path(sys.executable).parent
ONE_SETTING = ["test.episodes=2", "test.settings=[{n_way: 5, k_shot: 1}]"]


def sharebone_cli(cmd: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(BIN / f"sharebone-{cmd}"), *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def csv_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))


# --------------------------------------------------------------------------------------------
# callbacks/


def test_default_callbacks_are_the_checkpoints_the_learning_rate_and_progress(tmp_path):
    cfg = compose_train(tmp_path, FAST)
    assert set(cfg.callbacks) == {"model_checkpoint", "lr_monitor", "progress_bar"}
    model = build_run(cfg).regime
    made = build_callbacks(cfg, model, tmp_path, loggers=[object()])
    best = made[0]
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/acc" and best.mode == "max"
    assert Path(best.dirpath) == tmp_path / "checkpoints" and best.filename == "best"
    assert sum(isinstance(c, ModelCheckpoint) for c in made) == 2, "best + every n steps"
    assert sum(isinstance(c, LearningRateMonitor) for c in made) == 1
    # No logger: nowhere to write the rate (Lightning would refuse the monitor).
    assert not any(isinstance(c, LearningRateMonitor)
                   for c in build_callbacks(cfg, model, tmp_path, loggers=[]))
    # debug=fast turns bars off; with them on, stdout here is no terminal: plain lines.
    assert not any(isinstance(c, ProgressBar) for c in made)
    shown = compose_train(tmp_path, FAST + ["trainer.enable_progress_bar=true"])
    bars = [c for c in build_callbacks(shown, model, tmp_path, loggers=[])
            if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], LineProgressBar)


def test_callback_presets_compose_with_the_users_own(tmp_path):
    cfg = compose_train(tmp_path, FAST + [
        "callbacks=[default,early_stopping,rich_progress]",
        "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer",
        "callbacks.model_checkpoint.monitor=val/loss"])
    assert set(cfg.callbacks) == {"model_checkpoint", "lr_monitor", "early_stopping",
                                  "progress_bar", "timer"}
    made = build_callbacks(cfg, build_run(cfg).regime, tmp_path, loggers=[object()])
    assert made[0].monitor == "val/loss" and made[0].mode == "min", "a loss goes down"
    stop = next(c for c in made if isinstance(c, EarlyStopping))
    assert stop.monitor == "val/acc", "monitor: null is the regime's validation score"
    assert any(type(c).__name__ == "Timer" for c in made)
    # debug=fast turns progress bars off: the preset is left out instead of failing the run.
    assert not any(isinstance(c, LineProgressBar | RichProgressBar) for c in made)
    none = compose_train(tmp_path, FAST + ["callbacks=none"])
    kept = build_callbacks(none, build_run(none).regime, tmp_path, loggers=[object()])
    assert isinstance(kept[0], ModelCheckpoint) and kept[0].monitor == "val/acc", \
        "checkpointing does not depend on the preset"


def test_a_callback_without_a_class_is_refused_with_the_fix(tmp_path):
    cfg = compose_train(tmp_path, FAST + ["+callbacks.mine.patience=3"])
    model = build_run(cfg).regime
    with pytest.raises(ValueError, match=r"callbacks.mine has no _target_.*~callbacks.mine"):
        build_callbacks(cfg, model, tmp_path)
    cfg = compose_train(tmp_path, FAST + ["+callbacks.model_checkpoint.save_top_k=3"])
    with pytest.raises(ValueError, match=r"monitor and mode only, not \['save_top_k'\]"):
        build_callbacks(cfg, model, tmp_path)


def test_early_stopping_stops_a_real_run(tmp_path):
    # No validation can beat the first by 2.0 in accuracy: stop after the second epoch.
    cfg = compose_train(tmp_path, FAST + ONE_SETTING + [
        "logger=csv", "trainer.max_epochs=6", "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=2.0"])
    metrics = run(cfg)
    epochs = {int(r["epoch"]) for r in csv_rows(tmp_path) if r.get("val/acc") and r["epoch"]}
    assert epochs == {0, 1}, f"stopped after 2 of 6 epochs, validated in {sorted(epochs)}"
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and "test/5w1s/acc" in metrics


def test_progress_presets_pick_a_bar_on_a_terminal_and_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    rich, tqdm = progress_bar("rich", stream=Terminal()), progress_bar("tqdm", stream=Terminal())
    assert isinstance(rich, RichProgressBar) and isinstance(tqdm, TQDMProgressBar)
    assert all(isinstance(bar, TrainMetricsShown) for bar in (rich, tqdm))
    assert type(progress_bar("rich", stream=io.StringIO())) is LineProgressBar
    with pytest.raises(ValueError, match="one of"):
        progress_bar("fancy")


def test_progress_lines_in_a_real_run_without_a_terminal(tmp_path, capsys, caplog):
    cfg = compose_train(tmp_path, FAST + ONE_SETTING + [
        "callbacks=[default,rich_progress]", "trainer.enable_progress_bar=true",
        "callbacks.progress_bar.every_seconds=0"])
    with caplog.at_level(logging.INFO, logger="sharebone.callbacks.progress"):
        run(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "sharebone.callbacks.progress"]
    steps = [line for line in lines if line.startswith("epoch")]
    assert [line.split(",")[0] for line in steps] == [
        "epoch 1/1: 1/3 steps", "epoch 1/1: 2/3 steps", "epoch 1/1: 3/3 steps"]
    # debug=fast logs every step: each line shows that step's training metrics
    assert all(re.search(r"train/loss=[\d.]+, train/acc=[\d.]+", line) for line in steps)
    assert any(line.startswith("validation after epoch 1: val/acc=") for line in lines)
    out = capsys.readouterr()
    for stream in (out.out, out.err):
        assert "\r" not in stream and "\x1b[" not in stream, "no bar drawn: no \\r, no colour"


# --------------------------------------------------------------------------------------------
# hparams_search/


def test_the_optuna_preset_searches_on_a_validation_metric():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="pip install -e '.[optuna]' (in the dev extra)")
    cfg, context = hydra_context(["hparams_search=protonet_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.objective == "val/acc" and sweeper.direction == "maximize"
    assert cfg.regime.name == "protonet"
    assert set(sweeper.params) == {"regime.lr", "regime.distance", "sampler.train.n_way"}
    Plugins.instance().instantiate_sweeper(
        hydra_context=context, task_function=sharebone.run.cli.train_app.__wrapped__, config=cfg)
    old, _ = hydra_context(["hydra/sweeper=lr_search"])  # the older preset still composes
    assert old.hydra.sweeper.params["regime.lr"] == "tag(log, interval(1e-4, 1e-2))"


def test_an_objective_on_the_test_episodes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tune on the test episodes"):
        check_objective(compose_train(tmp_path, FAST + ["objective=test/5w1s/acc"]))
    check_objective(compose_train(tmp_path, FAST + ["objective=val/acc"]))
    with pytest.raises(KeyError, match=r"objective=val/mse is not among .*val/acc"):
        sharebone.run.train.objective(compose_train(tmp_path, FAST + ["objective=val/mse"]),
                                  {"val/acc": 0.5, "test/5w1s/acc": 0.6})


def test_an_optuna_search_runs_trials_and_returns_the_val_score(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="pip install -e '.[optuna]' (in the dev extra)")
    out = sharebone_cli("train", "hparams_search=protonet_optuna", *FAST, *ONE_SETTING,
                        "hydra.sweeper.n_trials=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(trials) == 2, "no -m needed: the preset is a multirun"
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    scores = [json.loads(p.read_text())["val/acc"] for p in trials]
    assert best["best_value"] == pytest.approx(max(scores)), "Optuna got the val score"


# --------------------------------------------------------------------------------------------
# local/


def test_an_optional_local_config_overrides_and_is_ignored_by_git(tmp_path):
    mine = tmp_path / "mine" / "local"
    mine.mkdir(parents=True)
    (mine / "default.yaml").write_text("# @package _global_\nseed: 1234\ntags: [laptop]\n")
    out = sharebone_cli("train", "--config-dir", str(tmp_path / "mine"), "--cfg", "job",
                        cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    assert job["seed"] == 1234 and job["tags"] == ["laptop"]
    # sharebone-eval reads its own: local/eval.yaml (its keys differ from training's)
    (mine / "eval.yaml").write_text("# @package _global_\nepisodes: 77\nlogger: none\n")
    out = sharebone_cli("eval", "--config-dir", str(tmp_path / "mine"), "--cfg", "job",
                        "ckpt=some.ckpt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout)
    assert job["episodes"] == 77 and job["ckpt"] == "some.ckpt" and job["seed"] == 0
    # Absent (the repository has only .gitkeep), the config composes without it.
    assert not list((REPO_ROOT / "configs" / "local").glob("*.yaml")) or pytest.skip(
        "this checkout has its own configs/local/*.yaml")
    assert compose_train(tmp_path, FAST).seed == 0
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the .gitignore rule cannot be checked")
    ignored = subprocess.run(["git", "check-ignore", "configs/local/default.yaml",
                              "configs/local/gpu_box.yaml", "configs/local/.gitkeep"],
                             cwd=REPO_ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == ["configs/local/default.yaml", "configs/local/gpu_box.yaml"]


# --------------------------------------------------------------------------------------------
# tags, TensorBoard, train/test switches


def test_tensorboard_and_csv_at_once_with_tags_in_their_hparams(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (in the dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train(tmp_path, FAST + ONE_SETTING + [
        "logger=[csv,tensorboard]", "tags=[baseline,tb]", "trainer.max_epochs=2"])
    metrics = run(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ("val/acc", "val/loss", "train/loss", "lr-Adam", "test/5w1s/acc"):
        assert name in scalars, f"{name} not among {scalars}"
    val = [e.value for e in events.Scalars("val/acc")]
    assert len(val) == 3, "one per validation (2 epochs), and the run's summary"
    assert val[-1] == pytest.approx(metrics["val/acc"])
    for hparams in (tmp_path / "tensorboard" / "hparams.yaml", tmp_path / "csv" / "hparams.yaml"):
        assert yaml.safe_load(hparams.read_text())["tags"] == ["baseline", "tb"]
    assert csv_rows(tmp_path), "the CSV logger ran beside it"


def test_logger_presets_compose_one_or_several(tmp_path):
    assert set(compose_train(tmp_path, ["logger=many"]).logger) == {"wandb", "csv", "tensorboard"}
    assert set(compose_train(tmp_path, ["logger=[csv,tensorboard]"]).logger) == {
        "csv", "tensorboard"}
    assert compose_train(tmp_path, ["logger=tensorboard"]).logger.tensorboard.log_graph is False


def test_bad_tags_and_unknown_loggers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="tags="):
        run(compose_train(tmp_path, FAST + ["tags=[ok,'']"]))
    with pytest.raises(ValueError, match="unknown logger.*tensorbord"):
        run(compose_train(tmp_path / "b", FAST + ["+logger.tensorbord={}"]))


def test_train_false_tests_a_checkpoint_as_the_run_did(tiny_run, tmp_path):
    cfg = compose_train(tmp_path, FAST + ["sampler.batches_per_epoch=2", *ONE_SETTING,
                                          "train=false", f"ckpt_path={tiny_run}"])
    metrics = run(cfg)
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test/5w1s/acc"] == pytest.approx(trained["test/5w1s/acc"]), \
        "same weights, same episodes, same score"
    assert "train_seconds" not in metrics and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert list(tmp_path.glob("fewshot*.json"))


def test_train_and_test_switches_refuse_what_makes_no_sense(tiny_run, tmp_path):
    cases = [(["train=false"], "pass ckpt_path="),
             ([f"ckpt_path={tiny_run}"], "to continue training a run, use resume="),
             (["train=false", "test.enabled=false", f"ckpt_path={tiny_run}"], "nothing to do"),
             (["train=false", f"ckpt_path={tiny_run}", "regime=maml"],
              "ckpt_path=.* was trained with another regime")]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises((ValueError, RunDirError), match=message):
            run(compose_train(tmp_path / str(i), FAST + overrides))


def test_test_enabled_false_trains_without_scoring_the_test_episodes(tmp_path):
    metrics = run(compose_train(tmp_path, FAST + ["test.enabled=false"]))
    assert "val/acc" in metrics and not any(k.startswith("test/") for k in metrics)
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert not list(tmp_path.glob("fewshot*")), "no test results written"
    assert json.loads((tmp_path / "metrics.json").read_text())["val/acc"] == metrics["val/acc"]


# --------------------------------------------------------------------------------------------
# "did you mean"


@pytest.mark.parametrize(("args", "hydra_says", "hint"), [
    (["regime.lrr=1e-3"], "Could not override 'regime.lrr'", "Did you mean regime.lr?"),
    (["trainer.max_epoch=3"], "Could not override 'trainer.max_epoch'",
     "Did you mean trainer.max_epochs"),
    (["task=omniglot_smal"], "Could not find 'task/omniglot_smal'",
     "Did you mean task=omniglot_small"),
])
def test_a_mistyped_override_names_the_closest_keys(tmp_path, args, hydra_says, hint):
    out = sharebone_cli("train", *args, cwd=tmp_path)
    assert out.returncode != 0
    assert hydra_says in out.stderr, "Hydra's own message stays"
    assert hint in out.stderr, out.stderr


def test_eval_names_the_closest_key_too(tmp_path):
    out = sharebone_cli("eval", "ckpt=nowhere", "episods=3", cwd=tmp_path)
    assert out.returncode != 0
    assert "Did you mean episodes" in out.stderr, out.stderr


def test_hints_know_groups_sweeps_and_chosen_options():
    assert hints(["regime=maml", "regime.inner_lrr=1"], "train") == [
        "Did you mean regime.inner_lr or regime.inner_steps? ('regime.inner_lrr' is not a key "
        "of the train config)"]
    assert hints(["-m", "regime=protonett,maml"], "train")[0].startswith(
        "Did you mean regime=protonet?")
    assert hints(["callbacks=[default,early_stoping]"], "train")[0].startswith(
        "Did you mean callbacks=early_stopping?")
    assert hints(["regime.lr=1e-3", "+new.key=1", "~figures", "--cfg", "job"], "train") == []
    assert hints(["zzzzzz=1"], "train") == [], "nothing close: Hydra's message alone"
