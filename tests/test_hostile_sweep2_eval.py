"""Issue 19, the eval / tracking / output side: hostile and careless use of W&B, sharebone-eval
and the files a run writes. Each test failed on the code before its fix (19e5245).

The W&B service (``wandb-core``) is really stopped with SIGSTOP; the command line is really
run; a full disk is our own atomic write seeing ENOSPC (nothing else can make one here).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.configs import FAST, compose_train
from helpers.wandb_service import kill_stopped, stop_wandb_service, wandb_cores_of

from sharebone import tracking
from sharebone.run.train import run

TESTS = Path(__file__).resolve().parent
ONE_SETTING = ["test.episodes=2", "test.settings=[{n_way: 5, k_shot: 1}]"]
#: Generous: the point is that the run ends, not how fast (a limit of 3 s per W&B call).
NO_HANG_S = 120


def fast(*extra: str) -> list[str]:
    return [o for o in FAST if not o.startswith("logger=")] + list(extra)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS),
                                                         os.environ.get("PYTHONPATH", "")])}


class Hung(BaseException):
    """Not an Exception: code that swallows every Exception (a figure's guard) lets it by."""


@contextlib.contextmanager
def must_return_within(seconds: int, stopped: list[int] | None = None) -> Iterator[None]:
    """Fails the test (instead of hanging the suite) when the block runs past ``seconds``;
    the services in ``stopped`` are killed first, so that W&B's waits end as well."""
    def hung(signum, frame):
        kill_stopped(stopped or [])
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- item 1: a W&B service that does not answer ---------------------------------------------


def test_wandb_service_stopped_before_training_the_run_falls_back_to_csv(tmp_path):
    """A sweep's second job finds the W&B service stopped (SIGSTOP): ``wandb.init`` waited
    for it forever. Now it is ended after ``logger.wandb.timeout`` seconds, one warning says
    so, the run trains on CSV and writes its results."""
    first = tracking.build_loggers({"wandb": {"project": "sharebone-test"}}, tmp_path / "a")
    tracking.finish(first)  # the service stays up for the next run of this process
    stopped = stop_wandb_service()
    cfg = compose_train(tmp_path / "b", fast("logger=wandb", "logger.wandb.timeout=3",
                                             *ONE_SETTING))
    started = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught, \
                must_return_within(NO_HANG_S, stopped):
            warnings.simplefilter("always")
            metrics = run(cfg)
    finally:
        kill_stopped(stopped)
    assert time.monotonic() - started < NO_HANG_S
    said = [str(w.message) for w in caught if "did not answer" in str(w.message)]
    assert len(said) == 1 and "init within 3 s" in said[0] and "logger.wandb.timeout" in said[0]
    assert (tmp_path / "b" / "fewshot.json").is_file() and "test/5w1s/acc" in metrics
    rows = csv_rows(tmp_path / "b" / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2]


def test_the_cli_exits_when_the_wandb_service_is_stopped_mid_run(tmp_path):
    """``sharebone-train`` whose service is stopped after step 1: the run used to write its
    results and then wait in ``run.finish`` forever. Now it exits 0, results and CSV there.

    The limit is generous (30 s): it also bounds ``wandb.init``, which on a loaded CI machine
    took over 3 s, fell back to CSV before training and left no service to stop."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sharebone", "train",
           *fast("logger=wandb", "logger.wandb.timeout=30", *ONE_SETTING),
           "+callbacks.stop._target_=helpers.wandb_service.StopWandbService",
           "+callbacks.stop.step=1", f"hydra.run.dir={out}"]
    log = tmp_path / "stderr.txt"
    # Files, not pipes: a stopped wandb-core would hold a pipe open (and the test) for good.
    with open(log, "w") as err, open(tmp_path / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=stdout, stderr=err)
        try:
            code = proc.wait(timeout=NO_HANG_S + 120)  # the CLI's own start-up included
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "hung"
        finally:
            kill_stopped(wandb_cores_of(proc.pid))
    stderr = log.read_text()
    assert code == 0, stderr[-3000:]
    assert "did not answer" in stderr and "Traceback" not in stderr
    assert (out / "fewshot.json").is_file() and (out / "metrics.json").is_file()
    rows = csv_rows(out / "csv" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2]
    assert any(r.get("test/5w1s/acc") for r in rows)


def test_a_wandb_timeout_that_is_not_a_number_is_refused_by_name(tmp_path):
    with pytest.raises(tracking.SettingError, match=r"logger\.wandb\.timeout=.*number > 0"):
        tracking.build_loggers({"wandb": {"timeout": "soon"}}, tmp_path)


# -- items 2 and 3: a folder episode's outputs ----------------------------------------------


def square_episode(root: Path, classes: int, queries: int = 3) -> Path:
    """``classes`` support classes of one small image each, ``queries`` labelled queries."""
    from PIL import Image

    for c in range(classes):
        folder = root / "support" / f"c{c:04d}"
        folder.mkdir(parents=True)
        Image.new("L", (28, 28), (37 * c) % 256).save(folder / "0.png")
    for c in range(queries):
        folder = root / "query" / f"c{c:04d}"
        folder.mkdir(parents=True)
        Image.new("L", (28, 28), (37 * c) % 256).save(folder / "q.png")
    return root


def eval_episode(tiny_run: Path, tmp_path: Path, episode: Path, results: Path) -> dict:
    import sharebone.run.eval as sb_eval

    return sb_eval.run(compose_train(tmp_path, [f"ckpt={tiny_run}", f"episode_dir={episode}",
                                                f"output_dir={results}", "logger=none"],
                                     config_name="eval"))


def test_a_1000_way_folder_episode_writes_its_predictions_and_a_capped_figure(tiny_run,
                                                                                tmp_path):
    """1,000 classes: the accuracy was printed, then matplotlib's layout of a 1,000-column
    figure ran for over 5 minutes and the predictions were never written. Now the JSON is
    written first and the figure draws the first 20 classes, saying so."""
    episode = square_episode(tmp_path / "thousand", 1000)
    results = tmp_path / "results"
    with must_return_within(NO_HANG_S):
        summary = eval_episode(tiny_run, tmp_path, episode, results)
    written = Path(summary["paths"]["json"])
    assert written.is_file() and len(summary["classes"]) == 1000
    assert Path(summary["paths"]["png"]).is_file()


def test_the_episode_figure_states_the_classes_it_left_out():
    import torch

    from sharebone.tracking.figures import episode_figure

    labels = torch.arange(50)
    fig = episode_figure(torch.zeros(50, 1, 8, 8), labels, torch.zeros(3, 1, 8, 8),
                         torch.tensor([0, 1, 2]), max_classes=20)
    titles = [t.get_text() for sub in fig.subfigs for t in [sub._suptitle] if t is not None]
    assert any("50-way, first 20 classes" in t for t in titles), titles
    assert len([ax for ax in fig.subfigs[0].axes if ax.images]) == 20


def test_episode_outputs_are_named_by_their_folder_and_never_overwritten(tiny_run, tmp_path):
    """Two episodes (and one of them twice) into one output folder: three prediction files,
    each named by its episode folder; the first episode's were silently overwritten."""
    results = tmp_path / "results"
    cats = square_episode(tmp_path / "cats", 3)
    dogs = square_episode(tmp_path / "dogs", 4)
    first = eval_episode(tiny_run, tmp_path, cats, results)
    before = Path(first["paths"]["json"]).read_text()
    second = eval_episode(tiny_run, tmp_path, dogs, results)
    again = eval_episode(tiny_run, tmp_path, cats, results)
    names = sorted(p.name for p in results.glob("*.json"))
    assert len(names) == 3, names
    assert sum(n.startswith("episode_cats_") for n in names) == 2
    assert sum(n.startswith("episode_dogs_") for n in names) == 1
    assert Path(first["paths"]["json"]).read_text() == before
    assert Path(second["paths"]["json"]).with_suffix(".png").is_file()
    assert first["paths"]["json"] != again["paths"]["json"]


# -- item 4: a full disk -------------------------------------------------------------------


@contextlib.contextmanager
def full_disk_for(monkeypatch: pytest.MonkeyPatch, suffix: str, after: int = 0):
    """Our atomic writes of ``*<suffix>`` files, after the first ``after``, go to
    ``/dev/full``: the kernel answers their writes with ENOSPC, as a full disk does."""
    from sharebone import files

    real, seen = files._temp_file, []

    def temp_file(target: Path) -> tuple[int, str]:
        if target.name.endswith(suffix):
            seen.append(target)
            if len(seen) > after:
                tmp = target.parent / f".{target.name}.full.tmp"  # never created
                return os.open("/dev/full", os.O_WRONLY), str(tmp)
        return real(target)

    monkeypatch.setattr(files, "_temp_file", temp_file)
    yield seen


def test_a_full_disk_at_a_checkpoint_says_which_file_what_is_kept_and_how_to_resume(
        tmp_path, monkeypatch):
    """torch's ``enforce fail at inline_container.cc`` (ENOSPC in its context) becomes one
    line: the checkpoint not written, the earlier ones complete, ``resume=<run dir>``."""
    from sharebone.checkpoint_io import read_checkpoint
    from sharebone.files import DiskFullError

    cfg = compose_train(tmp_path, fast("logger=csv", "trainer.max_epochs=2", *ONE_SETTING))
    with full_disk_for(monkeypatch, ".ckpt", after=2) as seen, \
            pytest.raises(DiskFullError) as info:
        run(cfg)
    message = str(info.value)
    assert len(seen) == 3 and str(seen[-1]) in message, (seen, message)
    assert "No space left" in message and f"resume={tmp_path}" in message
    assert "\n" not in message and "inline_container" not in message
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert saved and all(read_checkpoint(p) for p in saved), "the earlier ones are complete"
    assert not list((tmp_path / "checkpoints").glob(".*")), "no temporary file left"


def test_an_eval_into_a_full_folder_is_a_clear_error_and_leaves_nothing(tiny_run, tmp_path,
                                                                        monkeypatch, capsys):
    import sharebone.run.eval as sb_eval
    from sharebone.errors import ShareboneError

    results = tmp_path / "results"
    cfg = compose_train(tmp_path, [f"ckpt={tiny_run}", "episodes=2", f"output_dir={results}",
                                   "settings=[{n_way: 5, k_shot: 1}]", "logger=none"],
                        config_name="eval")
    with full_disk_for(monkeypatch, ".csv"), pytest.raises(ShareboneError) as info:
        sb_eval.run(cfg)
    message = str(info.value)
    assert "No space left" in message and ".csv" in message and "output_dir=" in message
    assert "\n" not in message
    assert list(results.iterdir()) == [], "neither the JSON nor a temporary file is left"
    assert "5w1s" in capsys.readouterr().out, "the scores were printed"


# -- item 5: the task's images against the checkpoint's ----------------------------------------


def eval_cfg(tmp_path: Path, ckpt: Path, *extra: str):
    return compose_train(tmp_path, [f"ckpt={ckpt}", "episodes=2", "logger=none",
                                    "settings=[{n_way: 5, k_shot: 1}]",
                                    f"output_dir={tmp_path / 'results'}", *extra],
                         config_name="eval")


def test_an_omniglot_sized_checkpoint_on_a_3_channel_84px_task_is_refused_by_key(tiny_run,
                                                                               tmp_path):
    """A 1-channel 28 px conv4 on 3-channel 84 px images: torch's ``expected input[...] to have
    1 channels`` mid-scoring; now a refusal before scoring with the checkpoint's values."""
    import sharebone.run.eval as sb_eval
    from sharebone.evaluation.inputs import InputMismatchError

    cfg = eval_cfg(tmp_path, tiny_run, "task=synthetic_images", "task.channels=3",
                   "task.image_size=84")
    with pytest.raises(InputMismatchError) as info:
        sb_eval.run(cfg)
    message = str(info.value)
    assert message.startswith("task.channels=3") and "task.channels=1, task.image_size=28" \
        in message and "\n" not in message
    assert not (tmp_path / "results").exists(), "refused before anything was written"


def test_train_false_names_task_channels_too(tiny_run, tmp_path):
    from sharebone.evaluation.inputs import InputMismatchError

    cfg = compose_train(tmp_path / "again", fast("logger=none", "train=false",
                                                 f"ckpt_path={tiny_run}", "task.channels=3"))
    with pytest.raises(InputMismatchError, match=r"^task\.channels=3 .*task\.channels=1"):
        run(cfg)


def test_another_image_size_is_refused_only_where_it_cannot_work(tmp_path):
    """ProtoNet on conv4 takes 84 px images (its distances take any feature width); MAML's
    head of 64 inputs cannot take conv4's 1,600 features at 84 px: refused by task.image_size,
    not by torch's ``mat1 and mat2 shapes cannot be multiplied`` mid-scoring."""
    import sharebone.run.eval as sb_eval
    from sharebone.evaluation.inputs import InputMismatchError

    short = fast("logger=none", "sampler.batches_per_epoch=1", "test.enabled=false",
                 "figures.enabled=false")
    run(compose_train(tmp_path / "maml", short + ["regime=maml"]))
    run(compose_train(tmp_path / "proto", short))
    with pytest.raises(InputMismatchError, match=r"^task\.image_size=84 .*maml.*"
                                                 r"task\.image_size=28"):
        sb_eval.run(eval_cfg(tmp_path / "e1", tmp_path / "maml", "task=synthetic_images",
                             "task.image_size=84"))
    summary = sb_eval.run(eval_cfg(tmp_path / "e2", tmp_path / "proto", "task=synthetic_images",
                                   "task.image_size=84"))
    assert len(summary["results"]) == 1


# -- item 6: careless evaluations that did not hold ------------------------------------------


def run_eval_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sharebone", "eval", *overrides,
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    return subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=NO_HANG_S)


@pytest.mark.parametrize(("overrides", "said"), [
    # 19e5245: an empty table written, exit 0
    (["settings=[]"], "sharebone-eval: error: settings is empty"),
    # 19e5245: omegaconf's InterpolationKeyError with a traceback
    (["output_dir=/tmp/o_${x}"], "sharebone-eval: error: output_dir: Interpolation key 'x'"),
    # 19e5245: refused only after scoring and writing the results, by W&B's start
    (["logger.wandb.timeout=0"], "sharebone-eval: error: logger.wandb.timeout=0"),
])
def test_careless_evaluations_are_refused_before_scoring(tiny_run, tmp_path, overrides, said):
    quiet = [] if any(o.startswith("logger.") for o in overrides) else ["logger=none"]
    proc = run_eval_cli(tmp_path, f"ckpt={tiny_run}", "episodes=2", *quiet,
                        f"output_dir={tmp_path / 'results'}", *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1
    assert not (tmp_path / "results").exists(), "nothing scored, nothing written"


def test_an_output_dir_that_is_a_file_is_refused_by_name(tiny_run, tmp_path):
    """19e5245: FileExistsError and a traceback from the results folder's check."""
    import sharebone.run.eval as sb_eval

    a_file = tmp_path / "results.txt"
    a_file.write_text("notes")
    with pytest.raises(sb_eval.OutputDirError, match=r"^output_dir=.*is a file, not a folder"):
        sb_eval.run(eval_cfg(tmp_path, tiny_run, f"output_dir={a_file}"))
    assert a_file.read_text() == "notes"
