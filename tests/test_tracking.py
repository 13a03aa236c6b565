"""W&B tracking, read back from the offline run's own records with `wandb leet inspect`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, compose_train

from sharebone.tracking import wandb_mode
from sharebone.train import run

WANDB = Path(sys.executable).parent / "wandb"


def inspect(run_dir: Path, *args: str) -> str:
    exe = str(WANDB) if WANDB.exists() else shutil.which("wandb")
    return subprocess.run([exe, "leet", "inspect", *args, str(run_dir)], check=True,
                          capture_output=True, text=True, timeout=120).stdout


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
