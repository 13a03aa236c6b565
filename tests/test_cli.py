"""The console entry points as a user types them: config printing, overrides, errors, multirun."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
FAST = ["task=synthetic_images", "debug=fast", "logger=none", "test.episodes=4",
        "test.settings=[{n_way: 5, k_shot: 1}]"]


def sharebone(cmd: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = BIN / f"sharebone-{cmd}"
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = sharebone("train", "--cfg", "job", "regime.lr=0.005", "backbone=mlp", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: protonet" in out.stdout
    assert "lr: 0.005" in out.stdout and "name: mlp" in out.stdout
    assert "name: omniglot_small" in out.stdout


def test_python_dash_m_equivalent(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sharebone", "train", "--cfg", "job",
                          "task=omniglot_lake"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "name: omniglot_lake" in out.stdout


def test_unknown_key_is_refused_with_a_hint(tmp_path):
    out = sharebone("train", "regime.learning_rate=1", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not override 'regime.learning_rate'" in out.stderr
    assert "+regime.learning_rate" in out.stderr  # Hydra's hint for adding a new key


def test_unknown_group_option_lists_the_available_ones(tmp_path):
    out = sharebone("train", "regime=protonett", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'regime/protonett'" in out.stderr and "protonet" in out.stderr


def test_multirun_runs_each_job_and_writes_results(tmp_path):
    out = sharebone("train", "-m", *FAST, "regime.lr=0.001,0.01", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted(tmp_path.glob("multirun/*/*/*/fewshot.csv"))
    assert len(results) == 2
    for path in results:
        row = next(csv.DictReader(path.open()))
        assert row["setting"] == "5w1s" and 0 <= float(row["mean"]) <= 1


def test_train_then_eval_from_the_command_line(tmp_path):
    out = sharebone("train", *FAST, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shared=111,936  task-specific=0" in out.stdout
    for noise in ("litlogger", "LeafSpec"):  # known harmless lines are filtered at the source
        assert noise not in out.stdout + out.stderr
    assert "| 5w1s | 4 | acc |" in out.stdout
    assert "| 5w1s | 4 | acc |" in (tmp_path / "run" / "train.log").read_text()  # logged too
    ev = sharebone("eval", "ckpt=run", "episodes=4", "settings=[{n_way: 5, k_shot: 1}]",
                   cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "| 5w1s | 4 | acc |" in ev.stdout
    assert len(list((tmp_path / "run" / "eval").glob("fewshot_synthetic_images_test_*.json"))) == 1
    # eval's own Hydra folder is outputs/eval/..., not one that looks like a training run
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["eval"]
    assert list((tmp_path / "outputs" / "eval").glob("*/*/eval.log"))
    assert "5w1s: 4/4 episodes" in ev.stdout  # progress, also without a terminal


@pytest.mark.parametrize("args, message", [
    (["ckpt=nowhere.ckpt"], "Checkpoint nowhere.ckpt does not exist"),
    ([], "Missing mandatory value: ckpt"),
])
def test_eval_errors_say_what_to_pass(tmp_path, args, message):
    out = sharebone("eval", *args, cwd=tmp_path)
    assert out.returncode != 0 and message in out.stderr


def test_resume_from_the_command_line_restores_the_runs_own_overrides(tmp_path):
    first = sharebone("train", *FAST, "task.family.flip=0.3", "sampler.batches_per_epoch=2",
                      "test.episodes=2", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # Only resume= and what may change: task, its flip and the rest come from run/.hydra.
    resumed = sharebone("train", "resume=run", "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "the run's own overrides ['task=synthetic_images'" in resumed.stdout
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    changed = sharebone("train", "resume=run", "task.family.flip=0.1", cwd=tmp_path)
    assert changed.returncode != 0
    assert "task.family.flip: the run has 0.3, this command has 0.1" in changed.stderr
