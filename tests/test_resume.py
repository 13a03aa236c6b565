"""Kill a training run (SIGKILL, mid-epoch), resume it: same episodes, same final weights.

Also: a checkpoint write killed half-way never leaves a truncated ``.ckpt``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from sharebone.callbacks.rng import RNGState
from sharebone.checkpoint_io import AtomicCheckpointIO, find_checkpoint, resume_checkpoint
from sharebone.data.datamodule import EpisodeLoader
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.tasks import EpochOffsetSampler, MetaBatches

TESTS = Path(__file__).resolve().parent
BATCHES, EPOCHS, EVERY, KILL_AT = 10, 2, 3, 14  # last.ckpt at step 12: epoch 1, batch 2


class EpisodeLog(pl.Callback):
    """Appends ``{"step", "classes"}`` of every training meta-batch to ``path`` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                "batch": batch_idx, "classes": batch.classes.tolist()}) + "\n")


class StallAt(pl.Callback):
    """After optimizer step ``step``, writes ``marker`` and stalls: the test kills it there."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)


def train(cwd: Path, run_dir: str, *args: str, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sharebone", "train", "task=synthetic_images", "debug=fast",
           "logger=none", f"sampler.batches_per_epoch={BATCHES}", f"trainer.max_epochs={EPOCHS}",
           "sampler.meta_batch_size=2", f"checkpoint.every_n_train_steps={EVERY}",
           "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]",
           f"hydra.run.dir={run_dir}", "+callbacks.log._target_=test_resume.EpisodeLog",
           f"+callbacks.log.path={cwd / run_dir}.episodes.jsonl", *args]
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return proc


def episodes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("resume")
    full = train(cwd, "full", wait=False)  # the uninterrupted run, alongside the killed one
    marker = cwd / "stalled"
    proc = train(cwd, "killed", "+callbacks.stall._target_=test_resume.StallAt",
                 f"+callbacks.stall.step={KILL_AT}", f"+callbacks.stall.marker={marker}",
                 wait=False)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step to kill it at"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_state = torch.load(cwd / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    train(cwd, "resumed", f"resume={cwd / 'killed'}")
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out[-3000:]
    return cwd, killed_state


def test_the_kill_lands_mid_epoch_after_a_step_checkpoint(killed_and_resumed):
    cwd, killed_state = killed_and_resumed
    assert killed_state["global_step"] == 12 and killed_state["epoch"] == 1
    seen = episodes(cwd / "killed.episodes.jsonl")
    assert len(seen) == KILL_AT and seen[-1]["epoch"] == 1  # ran on past the checkpoint


def test_resumed_run_sees_the_same_episodes_as_an_uninterrupted_one(killed_and_resumed):
    cwd, _ = killed_and_resumed
    full = episodes(cwd / "full.episodes.jsonl")
    assert len(full) == BATCHES * EPOCHS
    killed = episodes(cwd / "killed.episodes.jsonl")
    resumed = episodes(cwd / "resumed.episodes.jsonl")
    assert killed == full[:KILL_AT]
    assert resumed[0]["step"] == 12 and resumed == full[12:]


def test_resumed_run_ends_with_exactly_the_same_weights(killed_and_resumed):
    cwd, _ = killed_and_resumed
    # The resumed run goes on in the killed run's own directory.
    a, b = weights(cwd / "full"), weights(cwd / "killed")
    assert a["global_step"] == b["global_step"] == BATCHES * EPOCHS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for x, y in zip(a["optimizer_states"][0]["state"].values(),
                    b["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    full_metrics = json.loads((cwd / "full" / "metrics.json").read_text())
    resumed_metrics = json.loads((cwd / "killed" / "metrics.json").read_text())
    assert full_metrics["test/5w1s/acc"] == resumed_metrics["test/5w1s/acc"]
    assert not (cwd / "resumed" / "checkpoints").exists()


def best_scores(run: Path) -> list[torch.Tensor]:
    """What the best-checkpoint callback tracks, as saved in ``last.ckpt``."""
    return [state["best_model_score"] for key, state in weights(run)["callbacks"].items()
            if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None]


def test_resumed_run_keeps_the_best_checkpoint_of_its_first_part(killed_and_resumed):
    cwd, _ = killed_and_resumed
    full = torch.load(cwd / "full" / "checkpoints" / "best.ckpt", weights_only=True)
    resumed = torch.load(cwd / "killed" / "checkpoints" / "best.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"]
    for name, tensor in full["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    scores, full_scores = best_scores(cwd / "killed"), best_scores(cwd / "full")
    assert scores == full_scores and len(scores) == 1


def test_resume_takes_a_run_dir_last_checkpoint(killed_and_resumed, tmp_path):
    cwd, _ = killed_and_resumed
    assert resume_checkpoint(cwd / "killed") == str(cwd / "killed" / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(None) is None


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from sharebone.checkpoint_io import AtomicCheckpointIO

    class Stall:  # pickled after the tensors' records: the file is half written here
        def __reduce__(self):
            Path(sys.argv[2]).write_text("writing")
            time.sleep(600)

    io = AtomicCheckpointIO()
    target = Path(sys.argv[1])
    io.save_checkpoint({"version": 1, "w": torch.arange(10.0)}, target)
    io.save_checkpoint({"version": 2, "w": torch.zeros(1_000_000), "stall": Stall()}, target)
""")


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one_whole(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    target, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), str(target), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The previous checkpoint is intact; the half-written one is a hidden .tmp file that no
    # checkpoint search takes for a checkpoint.
    assert torch.load(target, weights_only=True)["version"] == 1
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")
    assert leftovers[0].endswith(".tmp") and not leftovers[0].endswith(".ckpt")
    assert find_checkpoint(tmp_path) == target
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == ["last.ckpt"]


def test_rng_state_travels_with_the_checkpoint():
    callback = RNGState()
    state = callback.state_dict()
    drawn = torch.rand(4)
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(4), drawn)


def test_atomic_io_writes_a_complete_file_and_leaves_nothing_else(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    io.save_checkpoint({"w": torch.zeros(3)}, tmp_path / "a.ckpt")
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_sampler_state_is_the_next_meta_batch_and_resume_skips_what_was_seen():
    sampler = EpochOffsetSampler(num_batches=5)
    sampler.set_epoch(1)
    it = iter(sampler)
    assert [next(it), next(it)] == [5, 6] and sampler.state_dict() == {"next_batch": 7}
    resumed = EpochOffsetSampler(num_batches=5)
    resumed.load_state_dict({"next_batch": 7})
    it = iter(resumed)  # created before set_epoch, as Lightning does on resume
    resumed.set_epoch(1)
    assert list(it) == [7, 8, 9]
    resumed.set_epoch(2)
    assert list(resumed) == [10, 11, 12, 13, 14]  # later epochs whole again


def test_loader_state_counts_what_the_loop_took_not_what_workers_fetched():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    source = EpisodeSampler(images, torch.arange(40) // 10, n_way=2, k_shot=1, q_query=1)
    loader = EpisodeLoader(MetaBatches(source, size=2, length=6), batch_size=None,
                           sampler=EpochOffsetSampler(6), num_workers=1, prefetch_factor=4)
    it = iter(loader)
    next(it), next(it)
    assert loader.state_dict() == {"next_batch": 2}  # the worker has fetched further ahead
    fresh = EpisodeLoader(MetaBatches(source, size=2, length=6), batch_size=None,
                          sampler=EpochOffsetSampler(6))
    fresh.load_state_dict(loader.state_dict())
    first = next(iter(fresh))
    assert torch.equal(first.classes, source.batch([4, 5]).classes)  # meta-batch 2
