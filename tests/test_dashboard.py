"""What a run shows: its W&B record read back with `wandb leet inspect` (name, tags, nested
config, best-value summary, learning rate, figures) and the same figures as PNGs in figures/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.configs import FAST, compose_train
from helpers.data import draw_shape
from helpers.wandb_service import leet_inspect as inspect
from PIL import Image

import sharebone.run.eval as sb_eval
from sharebone.run.train import run
from sharebone.tracking.dashboard import name_and_tags

FIGURES = ("val_episode.png", "learning_curves.png", "acc_vs_shots.png")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """ProtoNet on generated images, 2 epochs (2 validations), logged to W&B and CSV, with
    tags of its own."""
    out = tmp_path_factory.mktemp("dashboard")
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger=wandb", "+logger.csv={}", "trainer.max_epochs=2", "test.episodes=4",
        "tags=[baseline,conv4]",
        "test.settings=[{n_way: 5, k_shot: 1}, {n_way: 5, k_shot: 2}, {n_way: 3, k_shot: 1}]"]
    cfg = compose_train(out, overrides)
    metrics = run(cfg)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    return out, runs[0], cfg, metrics


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in inspect(run_dir, "--json").splitlines()]


def history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in records(run_dir) if r["type"] == "history"]


def test_the_run_is_named_and_tagged_by_what_it_is(two_epochs):
    _, run_dir, _, _ = two_epochs
    summary = json.loads(inspect(run_dir, "--summary", "--json"))
    assert re.fullmatch(r"protonet-synthetic_images-conv4-5w1s-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d",
                        summary["name"]), summary["name"]
    # the config's own tags first, then what the run is (conv4 once)
    assert summary["tags"] == ["baseline", "conv4", "protonet", "synthetic_images", "5w1s"]


def test_the_config_is_the_run_config_nested_once(two_epochs):
    _, run_dir, cfg, _ = two_epochs
    config = json.loads(inspect(run_dir, "--summary", "--json"))["config"]
    wanted = {k for k in cfg if cfg[k] != {}}  # W&B drops empty sections (callbacks: {})
    assert set(config) - {"_wandb"} == wanted, "top level: the run config's keys only"
    assert config["regime"]["lr"] == cfg.regime.lr and config["backbone"]["name"] == "conv4"
    for flat in ("lr", "lr_step", "name", "_target_"):
        assert flat not in config, f"Lightning's flat hparams logged too ({flat})"


def test_val_acc_summarises_its_best_and_the_learning_rate_is_logged(two_epochs):
    _, run_dir, _, _ = two_epochs
    summary = json.loads(inspect(run_dir, "--summary", "--json"))["summary"]
    rows = history(run_dir)
    val = [item["val/acc"] for item in rows if "val/acc" in item]
    assert len(val) >= 2, "one value per validation (2 epochs)"
    assert summary["val/acc"] == {"max": pytest.approx(max(val))}
    assert summary["val/loss"] == {"min": pytest.approx(min(i["val/loss"] for i in rows
                                                             if "val/loss" in i))}
    assert any(k.startswith("lr-") for item in rows for k in item), "learning rate logged"


def test_figures_are_logged_as_media(two_epochs):
    _, run_dir, _, _ = two_epochs
    rows = history(run_dir)
    media = {k.removesuffix("._type") for item in rows for k, v in item.items()
             if k.endswith("._type") and str(v).startswith("image")}
    assert {"val/episode", "test/acc_vs_shots"} <= media
    episodes = [item for item in rows if "val/episode._type" in item]
    assert len(episodes) == 2, "one episode figure per validation, none for the sanity check"
    files = {f["path"] for r in records(run_dir) if r["type"] == "files"
             for f in r["files"]["files"]}
    assert any(p.startswith("media/images/test/acc_vs_shots") for p in files)


def test_the_figures_are_pngs_in_the_run_directory(two_epochs):
    out, _, _, _ = two_epochs
    for name in FIGURES:
        with Image.open(out / "figures" / name) as image:
            image.verify()
        with Image.open(out / "figures" / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300, name
    assert not (out / "figures" / "acc_vs_inner_steps.png").exists(), "ProtoNet has no steps"


def test_a_user_named_run_keeps_its_name_and_tags():
    cfg = {"regime": {"name": "maml"}, "task": {"name": "omniglot"},
           "backbone": {"name": "conv4"}, "sampler": {"train": {"n_way": 20, "k_shot": 1}},
           "paths": {"output_dir": "outputs/2026-11-25/13-00-00"}}
    assert name_and_tags({}, cfg) == {
        "name": "maml-omniglot-conv4-20w1s-2026-11-25_13-00-00",
        "tags": ["maml", "omniglot", "conv4", "20w1s"]}
    assert name_and_tags({"name": "mine", "tags": ["x", "maml"]}, cfg) == {
        "name": "mine", "tags": ["x", "maml", "omniglot", "conv4", "20w1s"]}


def test_maml_without_wandb_writes_accuracy_vs_inner_steps(tmp_path):
    """CSV logger only: the figures are PNGs all the same (learning curves from the CSV)."""
    run(compose_train(tmp_path, [o for o in FAST if not o.startswith("logger=")] + [
        "logger=csv",
        "regime=maml", "test.episodes=2", "test.settings=[{n_way: 5, k_shot: 1}]",
        "regime.test_inner_steps=1", "figures.inner_steps_episodes=2",
        "figures.inner_steps_extra=1", "figures.val_episode=false"]))
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == ["acc_vs_inner_steps.png", "acc_vs_shots.png", "learning_curves.png"]
    with Image.open(tmp_path / "figures" / "acc_vs_inner_steps.png") as image:
        assert image.format == "PNG" and min(image.size) >= 300


def test_a_regression_run_summarises_val_mse_by_its_minimum(tmp_path):
    run(compose_train(tmp_path, [
        "experiment=sinusoid_maml", "debug=fast", "logger=wandb", "trainer.max_epochs=2",
        "sampler.batches_per_epoch=2", "sampler.val_episodes=4", "test.episodes=4",
        "figures.inner_steps_episodes=0"]))
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    summary = json.loads(inspect(run_dir, "--summary", "--json"))["summary"]
    val = [item["val/mse"] for item in history(run_dir) if "val/mse" in item]
    assert len(val) >= 2 and summary["val/mse"] == {"min": pytest.approx(min(val))}
    assert summary["test/mse_vs_shots"]["_type"].startswith("image")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["mse_vs_shots.png"]


def test_eval_of_an_episode_folder_draws_its_predictions(two_epochs, tmp_path):
    out, _, _, _ = two_epochs
    root = tmp_path / "episode"
    for i in range(2):
        draw_shape(root / "support" / "bar" / f"{i}.png", "bar", shift=2 * i)
        draw_shape(root / "support" / "ring" / f"{i}.png", "ring", shift=2 * i)
    draw_shape(root / "query" / "bar" / "q.png", "bar", shift=3)
    draw_shape(root / "query" / "unknown.png", "ring", shift=-2)
    results = tmp_path / "results"
    sb_eval.run(compose_train(tmp_path, [f"ckpt={out}", f"episode_dir={root}",
                                         f"output_dir={results}"], config_name="eval"))
    [written] = results.glob("episode_episode_*.json")
    with Image.open(written.with_suffix(".png")) as image:
        assert image.format == "PNG" and min(image.size) >= 300
