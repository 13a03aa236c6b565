"""``sharebone-eval`` on W&B: a run of its own (job_type eval) in the training run's project,
grouped by the training run's id, read back from its offline records with `wandb leet inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.configs import FAST, compose_train
from helpers.wandb_service import leet_inspect as inspect
from PIL import Image

import sharebone.run.eval as sb_eval
from sharebone.run.train import run

SETTINGS = "settings=[{n_way: 5, k_shot: 1}, {n_way: 5, k_shot: 2}, {n_way: 3, k_shot: 1}]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ProtoNet on generated images, logged to W&B project ``sb-train`` in a Hydra-style
    ``<date>/<time>`` run directory (so its W&B name is known from the checkpoint)."""
    out = tmp_path_factory.mktemp("trained") / "2026-11-26" / "09-00-00"
    run(compose_train(out, [o for o in FAST if not o.startswith("logger=")] + [
        "logger=wandb", "logger.wandb.project=sb-train", "test.episodes=2"]))
    train_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(train_runs) == 1
    return out, train_runs[0].name.rsplit("-", 1)[1]


def evaluate(tmp_path: Path, ckpt: Path, *overrides: str) -> tuple[dict, Path]:
    results = tmp_path / "results"
    summary = sb_eval.run(compose_train(tmp_path, [f"ckpt={ckpt}", "episodes=6", SETTINGS,
                                                   f"output_dir={results}", *overrides],
                                        config_name="eval"))
    return summary, results


def only_run(folder: Path) -> Path:
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def run_record(run_dir: Path) -> dict:
    records = [json.loads(line) for line in inspect(run_dir, "--json").splitlines()]
    return next(r["run"] for r in records if r["type"] == "run")


@pytest.fixture(scope="module")
def evaluation(trained, tmp_path_factory):
    out, train_id = trained
    tmp = tmp_path_factory.mktemp("eval")
    summary, results = evaluate(tmp, out)
    return summary, results, only_run(results), train_id, out


def test_the_eval_run_is_linked_to_its_training_run(evaluation):
    _, _, run_dir, train_id, out = evaluation
    record = run_record(run_dir)
    assert record["job_type"] == "eval"
    assert record["project"] == "sb-train", "the training run's project"
    assert record["run_group"] == train_id, "grouped by the training run's W&B id"
    assert record["run_id"] != train_id
    assert record["display_name"].startswith("eval-protonet-synthetic_images-test-")
    assert record["tags"] == ["eval", "protonet", "synthetic_images", "conv4", "5w1s"]
    config = json.loads(inspect(run_dir, "--summary", "--json"))["config"]
    assert config["train_run_id"] == train_id
    assert config["train_run_name"] == "protonet-synthetic_images-conv4-5w1s-2026-11-26_09-00-00"
    assert config["train_run_dir"] == str(out) and config["train_project"] == "sb-train"


def test_the_eval_config_is_logged(evaluation):
    summary, _, run_dir, _, out = evaluation
    config = json.loads(inspect(run_dir, "--summary", "--json"))["config"]
    assert config["checkpoint"] == str(out / "checkpoints" / "best.ckpt")
    assert config["ckpt"] == str(out) and config["regime"] == "protonet"
    assert config["task"]["name"] == "synthetic_images"
    assert config["settings"] == [{"n_way": 5, "k_shot": 1}, {"n_way": 5, "k_shot": 2},
                                  {"n_way": 3, "k_shot": 1}]
    assert (config["episodes"], config["seed"], config["split"], config["q_query"]) == \
        (6, 0, "test", 15)
    assert config["results"] == summary["paths"]["json"]
    assert "logger" not in config


def test_the_scores_are_summary_metrics_with_training_names_and_a_table(evaluation):
    summary, _, run_dir, _, _ = evaluation
    written = json.loads(Path(summary["paths"]["json"]).read_text())["results"]
    logged = json.loads(inspect(run_dir, "--summary", "--json"))["summary"]
    for r in written:
        assert logged[f"test/{r['setting']}/acc"] == pytest.approx(r["mean"])
        assert logged[f"test/{r['setting']}/ci95"] == pytest.approx(r["ci95"])
    table = logged["test/results"]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    saved = json.loads((run_dir / "files" / table["path"]).read_text())
    rows = [dict(zip(saved["columns"], row, strict=True)) for row in saved["data"]]
    assert [(r["n_way"], r["k_shot"], r["episodes"]) for r in rows] == [(5, 1, 6), (5, 2, 6),
                                                                       (3, 1, 6)]
    assert [r["mean"] for r in rows] == pytest.approx([r["mean"] for r in written])
    assert [r["ci95"] for r in rows] == pytest.approx([r["ci95"] for r in written])


def test_the_accuracy_vs_shots_figure_is_on_wandb_and_beside_the_results(evaluation):
    summary, results, run_dir, _, _ = evaluation
    logged = json.loads(inspect(run_dir, "--summary", "--json"))["summary"]
    image = logged["test/acc_vs_shots"]
    assert image["_type"].startswith("image") and image["format"] == "png"
    assert (run_dir / "files" / image["filenames"][0]).is_file()
    png = Path(summary["paths"]["json"]).with_name(
        Path(summary["paths"]["json"]).stem + "_acc_vs_shots.png")
    with Image.open(png) as picture:
        assert picture.format == "PNG" and min(picture.size) >= 300


def test_each_evaluation_is_a_run_of_its_own_and_a_project_given_wins(trained, tmp_path):
    out, train_id = trained
    evaluate(tmp_path, out, "logger.wandb.project=sb-evals")
    evaluate(tmp_path, out, "episodes=2")
    runs = sorted((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    records = [run_record(r) for r in runs]
    assert sorted(r["project"] for r in records) == ["sb-evals", "sb-train"]
    assert {r["run_group"] for r in records} == {train_id}
    assert len({r["run_id"] for r in records}) == 2


def test_logger_none_writes_no_wandb_run(trained, tmp_path):
    out, _ = trained
    summary, results = evaluate(tmp_path, out, "logger=none")
    assert Path(summary["paths"]["json"]).is_file()
    assert not (results / "wandb").exists()


def test_a_broken_wandb_setup_never_loses_the_results(trained, tmp_path):
    out, _ = trained
    with pytest.warns(UserWarning, match="W&B could not start"):
        summary, results = evaluate(tmp_path, out, "+logger.wandb.no_such_option=1")
    assert len(json.loads(Path(summary["paths"]["json"]).read_text())["results"]) == 3
    assert not (results / "csv").exists(), "no CSV logger: the results are CSV files already"


def test_a_checkpoint_trained_without_wandb_is_evaluated_on_wandb_unlinked(tmp_path):
    train_dir = tmp_path / "train"
    run(compose_train(train_dir, FAST + ["test.episodes=2"]))  # logger=none
    evaluate(tmp_path, train_dir)
    run_dir = only_run(tmp_path / "results")
    record = run_record(run_dir)
    assert record["project"] == "sharebone" and not record.get("run_group")
    config = json.loads(inspect(run_dir, "--summary", "--json"))["config"]
    assert config["train_run_id"] is None and config["train_run_name"] is None


def test_a_list_of_tasks_is_one_eval_run_with_a_row_per_task(trained, tmp_path):
    out, train_id = trained
    summary, results = evaluate(tmp_path, out, "convert=auto",
                                "tasks=[synthetic_images,synthetic_images_rgb84]")
    run_dir = only_run(results)
    record = run_record(run_dir)
    assert record["job_type"] == "eval" and record["run_group"] == train_id
    assert record["display_name"].startswith("eval-protonet-tasks-test-")
    assert {"synthetic_images", "synthetic_images_rgb84"} <= set(record["tags"])
    logged = json.loads(inspect(run_dir, "--summary", "--json"))
    assert logged["config"]["tasks"] == ["synthetic_images", "synthetic_images_rgb84"]
    for r in summary["results"]:
        assert logged["summary"][f"test/{r['task']}/{r['setting']}/acc"] == \
            pytest.approx(r["mean"])
    table = logged["summary"]["test/results"]
    saved = json.loads((run_dir / "files" / table["path"]).read_text())
    rows = [dict(zip(saved["columns"], row, strict=True)) for row in saved["data"]]
    assert [(r["task"], r["setting"]) for r in rows] == [
        (r["task"], r["setting"]) for r in summary["results"]]
    assert "RGB -> grey" in rows[-1]["conversion"]
