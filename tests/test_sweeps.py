"""Sweeps: a multirun under DDP writes one summary and groups its W&B runs; the SLURM
(submitit) launcher and the Optuna sweeper configs compose, and the job Hydra submits pickles.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import FAST, hydra_context
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton

import sharebone.run.cli
from sharebone.run.sweep import swept_keys, write_summary

BIN = Path(sys.executable).parent
WANDB = BIN / "wandb"


def wandb_run_record(run_dir: Path) -> dict:
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_dir)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return next(json.loads(line)["run"] for line in out.splitlines() if '"type":"run"' in line)


def multirun(cwd: Path, *extra: str) -> tuple[Path, str]:
    """``sharebone-train -m`` over two learning rates, logging to W&B offline."""
    args = [a for a in FAST if not a.startswith("logger=")] + [
        "logger=wandb", "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]",
        "hydra.sweep.dir=sweep", "regime.lr=0.001,0.01", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([str(BIN / "sharebone-train"), "-m", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return cwd / "sweep", out.stdout


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return multirun(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory):
    """Each job a 2-process DDP run with ``strategy=ddp``: Lightning re-runs the command line
    (with its ``-m`` and sweep values) for rank 1."""
    return multirun(tmp_path_factory.mktemp("ddp_sweep"), "trainer=ddp_cpu",
                    "trainer.strategy=ddp", "sampler.meta_batch_size=2")


def job_dirs(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_one_run_per_job(sweep: Path) -> list[dict]:
    assert job_dirs(sweep) == ["0", "1"]
    records = []
    for job in ("0", "1"):
        assert (sweep / job / "fewshot.json").is_file() and (sweep / job / "metrics.json").is_file()
        assert not (sweep / job / ".rank_config.yaml").exists()
        runs = sorted((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"job {job}: {len(runs)} W&B runs (one per rank?)"
        records.append(wandb_run_record(runs[0]))
    assert not (sweep.parent / "outputs").exists() and not (sweep.parent / "multirun").exists()
    return records


def test_one_summary_table_of_all_runs(sweep):
    sweep, stdout = sweep
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["regime.lr"], r["status"]) for r in rows] == [
        ("0", "0.001", "done"), ("1", "0.01", "done")]
    for row in rows:
        assert 0 <= float(row["test/5w1s/acc"]) <= 1 and float(row["val/acc"]) >= 0
    table = (sweep / "summary.md").read_text()
    assert "| job | regime.lr | val/acc | 5w1s/acc | train s | status |" in table
    assert "2 of 2 jobs done" in table and "sweep summary" in stdout


def test_wandb_runs_of_a_sweep_are_grouped_and_named_by_their_values(sweep):
    records = check_one_run_per_job(sweep[0])
    assert {r["run_group"] for r in records} == {"sweep"}  # hydra.sweep.dir=sweep
    assert [r["display_name"] for r in records] == ["0:regime.lr=0.001", "1:regime.lr=0.01"]


@pytest.mark.slow
def test_ddp_jobs_of_a_sweep_are_one_run_dir_and_one_wandb_run_each(ddp_sweep):
    """Rank 1 of each job made no directory, no W&B run, and started no sweep of its own."""
    sweep, _ = ddp_sweep
    records = check_one_run_per_job(sweep)
    assert [r["display_name"] for r in records] == ["0:regime.lr=0.001", "1:regime.lr=0.01"]
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 2


def test_summary_lists_jobs_that_did_not_finish(tmp_path):
    for job, metrics in (("0", {"val/acc": 0.5, "test/5w1s/acc": 0.6, "test/5w1s/ci95": 0.01}),
                         ("1", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- x=1\n")
        if metrics:
            (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    paths = write_summary(tmp_path)
    table = paths["md"].read_text()
    assert "| 0 | 0 | 0.5000 | 60.00 ± 1.00 |  | done |" in table
    assert "| 1 | 1 |  |  |  | failed or running |" in table
    assert "1 of 2 jobs done" in table


def test_swept_keys_from_the_command_line_and_the_sweeper():
    args = ["regime.lr=1e-3,1e-2", "seed=0", "test.settings=[{n_way: 5, k_shot: 1}]",
            "+x=range(3)", "hydra.run.dir=a,b"]
    assert swept_keys(args, {"regime.lr": "interval(0,1)", "backbone.hidden": "choice(32,64)"}) \
        == ["regime.lr", "x", "backbone.hidden"]


def test_slurm_launcher_composes_and_the_submitted_job_pickles(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="pip install -e '.[slurm]' (in the dev extra)")
    import cloudpickle
    import submitit

    cfg, context = hydra_context(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                  "hydra.launcher.tasks_per_node=4", "trainer=ddp",
                                  "trainer.devices=4", f"hydra.sweep.dir={tmp_path}"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.tasks_per_node == 4
    assert cfg.hydra.launcher.submitit_folder == f"{tmp_path}/.submitit/%j"
    # The task function Hydra hands the launcher is the undecorated app.
    task_function = sharebone.run.cli.train_app.__wrapped__
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=context, task_function=task_function, config=cfg)
    # submitit pickles the launcher with the job's arguments (cloudpickle) for each array job.
    submission = submitit.helpers.DelayedSubmission(
        launcher, ["regime.lr=0.001"], "hydra.sweep.dir", 0, "job_id_for_0", Singleton.get_state())
    restored = cloudpickle.loads(cloudpickle.dumps(submission))
    assert restored.function.task_function.__name__ == "train_app"
    assert restored.function.config.hydra.launcher.partition == "gpu"
    assert restored.args[0] == ["regime.lr=0.001"]


def test_optuna_sweeper_composes_and_searches_the_learning_rate(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="pip install -e '.[optuna]' (in the dev extra)")
    cfg, context = hydra_context(["hydra/sweeper=lr_search"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.params["regime.lr"] == "tag(log, interval(1e-4, 1e-2))"
    Plugins.instance().instantiate_sweeper(hydra_context=context,
                                           task_function=sharebone.run.cli.train_app.__wrapped__,
                                           config=cfg)
