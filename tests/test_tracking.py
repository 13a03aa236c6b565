"""W&B tracking, read back from the offline run's own records with `wandb leet inspect`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from helpers.configs import FAST, compose_train
from helpers.wandb_service import leet_inspect as inspect

from sharebone.regimes.loading import load_regime
from sharebone.run.train import run
from sharebone.tracking import build_loggers, finish, wandb_mode, wandb_run_id
from sharebone.tracking.eval_run import training_run


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb_run")
    overrides = [o for o in FAST if not o.startswith("logger=")] + ["logger=wandb",
                                                                    "test.episodes=10"]
    metrics = run(compose_train(out, overrides))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run per training run"
    return runs[0], metrics


def test_offline_run_holds_config_params_curves_and_test_results(wandb_run):
    run_dir, metrics = wandb_run
    summary = json.loads(inspect(run_dir, "--summary", "--json"))
    config = summary["config"]
    assert config["regime"]["name"] == "protonet"
    assert config["task"]["name"] == "synthetic_images" and config["backbone"]["name"] == "conv4"
    records = [json.loads(line) for line in inspect(run_dir, "--json").splitlines()]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = {k for item in history for k in item}
    assert {"train/loss", "train/acc", "val/acc", "val/loss", "params/shared",
            "params/task_specific"} <= logged
    shared = next(item["params/shared"] for item in history if "params/shared" in item)
    assert shared == 111936
    final = next(item for item in history if "test/5w1s/acc" in item)
    for key in ("test/5w1s/acc", "test/20w5s/ci95"):
        assert final[key] == pytest.approx(metrics[key])
    assert any(k.startswith("test/results") for k in logged), "result table logged"
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert any(a.get("type") == "model" for a in artifacts), "checkpoint logged as model artifact"


def test_no_credentials_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"


def test_a_broken_wandb_setup_never_stops_training(tmp_path):
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger=wandb", "+logger.wandb.no_such_option=1", "test.episodes=4"]
    with pytest.warns(UserWarning, match="W&B could not start"):
        metrics = run(compose_train(tmp_path, overrides))
    assert "test/5w1s/acc" in metrics
    assert (tmp_path / "csv" / "metrics.csv").is_file(), "fell back to the CSV logger"


def history(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in inspect(run_dir, "--json").splitlines()]
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_a_run_resumed_in_its_own_directory_continues_its_wandb_run_and_csv(tmp_path):
    """Epoch 1, then ``resume=<that dir>`` for epoch 2 in the same directory: one W&B run id
    (offline, W&B writes a second directory for it; ``wandb sync`` joins them), its history
    going on from step 3, and one ``metrics.csv`` holding both epochs, nothing twice."""
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger=wandb", "+logger.csv={}", "test.episodes=2",
        "test.settings=[{n_way: 5, k_shot: 1}]"]
    run(compose_train(tmp_path, overrides))
    first_id = wandb_run_id(tmp_path)
    assert first_id
    metrics_csv = tmp_path / "csv" / "metrics.csv"
    with open(metrics_csv, newline="") as f:
        epoch_0 = [r for r in csv.DictReader(f) if r["train/loss"]]
    run(compose_train(tmp_path, overrides + [f"resume={tmp_path}", "trainer.max_epochs=2"]))

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{first_id}") for r in runs)
    assert wandb_run_id(tmp_path) == first_id
    steps = [[item["trainer/global_step"] for item in history(r) if "train/loss" in item]
             for r in runs]
    assert steps == [[0, 1, 2], [3, 4, 5]]
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in train] == [0, 1, 2, 3, 4, 5]
    assert [r["train/loss"] for r in train[:3]] == [r["train/loss"] for r in epoch_0]
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [2, 5]


def test_a_resume_continues_the_wandb_run_its_checkpoint_names(tmp_path):
    """Another W&B run written into the run directory since (an evaluation given
    ``output_dir=<run dir>``) is newer, but the checkpoint names the run that trained it."""
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger=wandb", "test.enabled=false"]
    run(compose_train(tmp_path, overrides))
    first_id = wandb_run_id(tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["sharebone"]["wandb_run_id"] == first_id
    (tmp_path / "wandb" / "offline-run-29991231_235959-evalrun1").mkdir()
    assert wandb_run_id(tmp_path) == "evalrun1"
    run(compose_train(tmp_path, overrides + [f"resume={tmp_path}", "trainer.max_epochs=2"]))
    resumed = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*")
                     if not p.name.endswith("evalrun1"))
    assert len(resumed) == 2 and all(name.endswith(f"-{first_id}") for name in resumed)
    best = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["sharebone"]["wandb_run_id"] == first_id and best["global_step"] == 6
    # an evaluation of it is grouped under the same run
    model = load_regime(tmp_path)
    assert model.wandb_run_id == first_id
    assert training_run(tmp_path, model.run_config, model.wandb_run_id)["train_run_id"] == first_id


def test_wandb_run_id_is_the_newest_run_in_the_folder(tmp_path):
    assert wandb_run_id(tmp_path) is None
    folder = tmp_path / "wandb"
    for name in ("offline-run-20260101_120000-aaaa1111", "run-20260102_080000-bbbb2222",
                 "offline-run-20251231_235959-cccc3333", "run-garbage", "latest-run.txt"):
        (folder / name).mkdir(parents=True)
    os.symlink(folder / "offline-run-20251231_235959-cccc3333", folder / "latest-run")
    assert wandb_run_id(tmp_path) == "bbbb2222"




def test_the_wandb_logger_does_not_pass_the_deprecated_anonymous_setting(tmp_path):
    logger = build_loggers({"wandb": {"mode": "offline", "project": "noise"}}, tmp_path)[0]
    assert "anonymous" not in logger._wandb_init
    finish([logger])
