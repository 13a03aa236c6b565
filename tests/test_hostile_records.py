"""Hostile and careless runs, second sweep (issue 19): a run record is data (it never runs code
or reads the environment on resume), a refused run touches nothing, a stopped run says so,
and a user's mistake is one line, not a traceback. Every run here is the real console script.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from sharebone.run.run_dir import restorable, restore_overrides
from sharebone.run.sweep import job_rows

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
FAST = ["task=synthetic_images", "debug=fast", "logger=none", "test.episodes=2",
        "test.settings=[{n_way: 5, k_shot: 1}]", "sampler.batches_per_epoch=2"]
#: Builds its keys at resolution time, so no "_target_" appears in the text (the first
#: sweep's filter): a callback that appends to a file of the attacker's choice.
HIDE = '${oc.env:NOPE,""}'
ATTACK = ("+callbacks.x=${oc.create:'{_tar" + HIDE + "get_: builtins.print, _ar" + HIDE
          + "gs_: [pwned], file: {_tar" + HIDE + "get_: builtins.open, _ar" + HIDE
          + "gs_: [VICTIM, a]}}'}")


def sharebone(cmd: str, *args: str, cwd: Path, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([str(BIN / f"sharebone-{cmd}"), *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def sharebone_here(cmd: str, *args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch,
                   capfd: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """The console script's own entry point (``sharebone.run.cli``), run in this process: the
    same parse, checks, message and exit code as ``sharebone(...)``, without a new Python
    importing torch and Lightning again (seconds each). One test per kind of mistake still
    runs the installed script itself."""
    from sharebone.run import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [f"sharebone-{cmd}", *args])
    capfd.readouterr()
    code = 0
    try:
        {"train": cli.train, "eval": cli.evaluate}[cmd]()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([f"sharebone-{cmd}", *args], code, out, err)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``folder``: its hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.md5(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run made by the console script (its own .hydra record), read-only."""
    cwd = tmp_path_factory.mktemp("finished")
    out = sharebone("train", *FAST, "hydra.run.dir=run", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "run"


def crafted(finished: Path, tmp_path: Path, overrides: list[str]) -> Path:
    """A copy of the finished run whose record says ``overrides``."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run


# -- 1. a record never runs code -----------------------------------------------------------


def test_a_record_that_builds_code_at_resolution_time_runs_nothing_on_resume(finished, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    run = crafted(finished, tmp_path, [*FAST, ATTACK.replace("VICTIM", str(victim))])
    out = sharebone("train", f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert victim.read_text() == "untouched\n"
    assert "pwned" not in (out.stdout + out.stderr).splitlines()  # print() never ran
    assert "not restoring" in out.stdout and "+callbacks.x=" in out.stdout
    assert "interpolation or resolver" in out.stdout


@pytest.mark.parametrize("override, reason", [
    ("+callbacks.evil._target_=os.system", "names code to call"),
    ("callbacks.model_checkpoint.monitor=val/loss", "callbacks is not a setting restored"),
    ("+logger.wandb.dir=/etc", "adds, deletes or repackages"),
    ("paths.output_dir=/elsewhere", "paths is not a setting restored"),
    ("cache_dir=/elsewhere", "cache_dir is not a setting restored"),
    ("ckpt_path=/some/other.ckpt", "ckpt_path is not a setting restored"),
    ("task=../../../tmp/evil", "group choice that is not a name"),
    ("backbone@backbone=conv4", "repackages"),
    ("~test", "adds, deletes"),
    ("regime.lr=choice(0.1,0.2)", "a sweep"),
    ("seed=1,2", "a sweep"),
    ("regime.lr=${oc.decode:'0.1'}", "interpolation or resolver"),
    ("tags=[\\${oc.env:HOME}]", "interpolation or resolver"),
    ("task.family.classes={train: [", "not a valid override"),
])
def test_what_a_record_may_not_bring_back(override, reason):
    assert reason in (restorable(override) or "")


@pytest.mark.parametrize("override", [
    "task=omniglot_small", "regime=maml", "callbacks=[default,early_stopping]", "logger=csv",
    "regime.lr=0.003", "sampler.train.n_way=20", "seed=3", "tags=[ablation,first]",
    "trainer.max_epochs=4", "task.family.splits={train: train.txt, val: val.txt}",
    "data_dir=/data/omniglot", "experiment=omniglot_protonet_5w1s",
])
def test_plain_settings_are_still_restored(override):
    assert restorable(override) is None


def test_only_restorable_overrides_come_back_and_the_rest_are_named(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["task=synthetic_images", "regime.lr=0.01", "hydra.run.dir=x", "cache_dir=/x"]))
    argv = restore_overrides(["sharebone-train", f"resume={tmp_path}", "regime.lr=0.02"])
    assert argv == ["sharebone-train", "task=synthetic_images", f"resume={tmp_path}",
                    "regime.lr=0.02"]
    out = capsys.readouterr().out
    assert "cache_dir=/x (cache_dir is not a setting restored on resume)" in out
    assert "hydra.run.dir" not in out  # where this process runs is Hydra's, not the record's


# -- 2. a record never reads the environment ---------------------------------------------------


def test_a_record_cannot_leak_an_environment_secret_into_the_run(finished, tmp_path):
    run = crafted(finished, tmp_path, [*FAST, "tags=['${oc.env:SECRET,none}']"])
    out = sharebone("train", f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path,
                    env={"SECRET": "hunter2-secret"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not restoring" in out.stdout
    leaked = [p for p in run.rglob("*") if p.is_file() and b"hunter2-secret" in p.read_bytes()]
    assert not leaked
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_sweep_summary_reads_job_records_as_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET", "hunter2-secret")
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- tags=${oc.env:SECRET}\n- seed=1\n")
    (row,) = job_rows(tmp_path)
    assert row["overrides"] == {"tags": "${oc.env:SECRET}", "seed": "1"}


# -- 4. a refused run touches nothing -----------------------------------------------------------


def test_a_refused_second_training_leaves_the_first_runs_directory_as_it_was(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    out = sharebone("train", *FAST, f"hydra.run.dir={run}", "seed=7",
                    "sampler.batches_per_epoch=3", cwd=tmp_path)
    assert out.returncode == 2 and "already holds another run's checkpoints" in out.stderr
    assert snapshot(run) == before
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == FAST


def test_a_refused_resume_leaves_no_stray_output_directory(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    out = sharebone("train", f"resume={run}", "task.family.flip=0.3", cwd=tmp_path)
    assert out.returncode == 2 and "task.family.flip: the run has" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no outputs/<date>/<time>
    assert snapshot(run) == before


# -- 5. a stopped run says so and exits non-zero --------------------------------------------------


class StallUntilSigterm(pl.Callback):
    """After optimizer step ``step``: writes ``marker``, then waits for a SIGTERM."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            while not trainer.received_sigterm:
                time.sleep(0.05)


def test_sigterm_exits_143_says_how_to_resume_and_the_checkpoint_resumes(tmp_path):
    marker = tmp_path / "stalled"
    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    args = [*FAST, "sampler.batches_per_epoch=4", "checkpoint.every_n_train_steps=2",
            "hydra.run.dir=run"]
    proc = subprocess.Popen(
        [str(BIN / "sharebone-train"), *args,
         "+callbacks.stall._target_=test_hostile_records.StallUntilSigterm",
         "+callbacks.stall.step=2", f"+callbacks.stall.marker={marker}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to stop it at"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "the run was stopped (SIGTERM) at step 2" in err
    assert f"sharebone-train resume={tmp_path / 'run'}" in err
    resumed = sharebone("train", "resume=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4


# -- 8. one clean line per mistake ----------------------------------------------------------------


def test_a_mistake_is_one_line_naming_the_key_exit_2(tmp_path):
    out = sharebone("train", *FAST, "test.q_query=1000", cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("sharebone-train: error: test.q_query: ")
    assert "Traceback" not in out.stderr and out.stderr.count("images per class") == 1
    full = sharebone("train", *FAST, "test.q_query=1000", cwd=tmp_path,
                     env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


@pytest.mark.parametrize("args, message", [
    (["sampler.train.n_way=abc"], "sharebone-train: error: sampler.train: n_way must be"),
    (["regime=maml", "regime.inner_steps=-1"], "sharebone-train: error: "),
    (["test.settings=[{n_way: 50, k_shot: 1}]"],
     "sharebone-train: error: test.settings[0].n_way: "),
])
def test_more_mistakes_are_one_line(tmp_path, monkeypatch, capfd, args, message):
    out = sharebone_here("train", *FAST, *args, cwd=tmp_path,
                         monkeypatch=monkeypatch, capfd=capfd)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr


def test_an_eval_mistake_is_one_line_too(finished, tmp_path):
    out = sharebone("eval", f"ckpt={finished}", "settings=[{n_way: 5, k_shot: 900}]",
                    cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sharebone-eval: error: settings[0].k_shot" in out.stderr
    assert "Traceback" not in out.stderr


# -- 10. every trainer config has the keys users override ------------------------------------


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_cpu", "gpu", "ddp"])
def test_trainer_precision_and_steps_are_keys_of_every_trainer(tmp_path, monkeypatch, capfd,
                                                               trainer):
    out = sharebone_here("train", f"trainer={trainer}", "trainer.precision=bf16-mixed",
                         "trainer.max_steps=5", "trainer.gradient_clip_val=1.0", "--cfg", "job",
                         cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert out.returncode == 0, out.stderr[-2000:]
    trainer_cfg = yaml.safe_load(out.stdout)["trainer"]
    assert trainer_cfg["precision"] == "bf16-mixed" and trainer_cfg["max_steps"] == 5


# -- hostile cases of this sweep's own (each gave a raw traceback, or passed silently) ---------


@pytest.mark.parametrize("args, message", [
    (["seed=-1"], "sharebone-train: error: seed must be an integer >= 0, got -1."),
    (["seed=abc"], "sharebone-train: error: seed must be an integer >= 0, got 'abc'."),
    (["seed=4294967296"], "sharebone-train: error: seed must be an integer from 0 to"),
    (["trainer.max_epochs=-5"], "sharebone-train: error: trainer: `max_epochs` must be"),
    (["trainer.precision=banana"], "sharebone-train: error: trainer: Precision 'banana'"),
    (["checkpoint.every_n_train_steps=-3"],  # was: silently no step checkpoints
     "sharebone-train: error: checkpoint.every_n_train_steps must be an integer >= 0"),
])
def test_settings_lightning_or_numpy_would_refuse_are_refused_first(tmp_path, monkeypatch, capfd,
                                                                    args, message):
    out = sharebone_here("train", *FAST, *args, cwd=tmp_path,
                         monkeypatch=monkeypatch, capfd=capfd)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("content, message", [
    (b"root:x:0:0:root:/root:/bin/bash\n", "it is not a zip archive, as torch.save writes"),
    (bytes(range(7, 107)), "its bytes are not a checkpoint torch.save wrote"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_so_not_called_code(tmp_path, content, message):
    """Was: ``list index out of range`` for a text file, and "it holds code" for random bytes."""
    path = tmp_path / "not.ckpt"
    path.write_bytes(content)
    out = sharebone("eval", f"ckpt={path}", cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "holds code" not in out.stderr and "weights_only=False" not in out.stderr
