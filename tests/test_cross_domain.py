"""sharebone-eval across task families (issue 22, item 4): the stated conversion (grey <->
RGB, resize), refused where impossible, and one table for a list of tasks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers.configs import compose_train

from sharebone.errors import SettingError
from sharebone.evaluation.inputs import InputConversion, InputMismatchError, plan_conversion


def eval_cfg(tmp_path: Path, ckpt: Path, *extra: str):
    return compose_train(tmp_path, [f"ckpt={ckpt}", "episodes=3", "logger=none",
                                    "settings=[{n_way: 5, k_shot: 1}]",
                                    f"output_dir={tmp_path / 'results'}", *extra],
                         config_name="eval")


def test_the_conversion_is_the_stated_one():
    red = torch.zeros(2, 4, 3, 8, 8)
    red[:, :, 0] = 1.0
    grey = InputConversion(channels=(3, 1)).images(red)
    assert grey.shape == (2, 4, 1, 8, 8) and torch.allclose(grey, torch.full_like(grey, 0.299))
    back = InputConversion(channels=(1, 3)).images(grey)
    assert back.shape == (2, 4, 3, 8, 8) and torch.equal(back[:, :, 2], grey[:, :, 0])
    small = InputConversion(size=(8, 4)).images(torch.ones(5, 1, 8, 8))
    assert small.shape == (5, 1, 4, 4) and torch.allclose(small, torch.ones_like(small))


def test_what_cannot_be_converted_is_refused_by_key():
    trained = {"task": {"channels": 1, "image_size": 28}}
    plan = plan_conversion({"channels": 3, "image_size": 84}, trained, None, "ckpt")
    assert plan.channels == (3, 1) and plan.size == (84, 28)
    assert "RGB -> grey" in plan.describe() and "84 px -> 28 px" in plan.describe()
    with pytest.raises(InputMismatchError, match=r"^task\.channels=4 .*grey into RGB"):
        plan_conversion({"channels": 4, "image_size": 28}, trained, None, "ckpt")
    with pytest.raises(SettingError, match=r"^convert must be one of"):
        plan_conversion({"channels": 1, "image_size": 28}, trained, None, "ckpt", "yes")
    assert not plan_conversion({"channels": 3, "image_size": 84}, trained, None, "ckpt", "none")


def test_one_command_scores_a_checkpoint_on_a_list_of_tasks(tiny_run, tmp_path, capsys):
    """A 1-channel 28 px ProtoNet scored on its own task and on 3-channel 84 px images."""
    import sharebone.run.eval as sb_eval

    summary = sb_eval.run(eval_cfg(tmp_path, tiny_run, "convert=auto",
                                   "tasks=[synthetic_images,synthetic_images_rgb84]"))
    rows = summary["results"]
    assert [r["task"] for r in rows] == ["synthetic_images", "synthetic_images_rgb84"]
    assert rows[0]["conversion"] == "none" and "RGB -> grey" in rows[1]["conversion"]
    assert all(0.0 <= r["mean"] <= 1.0 and r["episodes"] == 3 for r in rows)
    with open(summary["paths"]["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["task"] for r in table] == ["synthetic_images", "synthetic_images_rgb84"]
    out = capsys.readouterr().out
    assert "| task | input conversion | setting |" in out and "84 px -> 28 px" in out


def test_a_list_is_checked_whole_before_any_scoring(tiny_run, tmp_path):
    import sharebone.run.eval as sb_eval

    with pytest.raises(InputMismatchError, match=r"^tasks\[1\] \(synthetic_images_rgb84\): "
                                                 r"task\.channels=3 .*convert=auto"):
        sb_eval.run(eval_cfg(tmp_path, tiny_run,
                             "tasks=[synthetic_images,synthetic_images_rgb84]"))
    with pytest.raises(SettingError, match=r"^tasks\[0\]: no task config 'no_such_task'"):
        sb_eval.run(eval_cfg(tmp_path, tiny_run, "tasks=[no_such_task]"))
    assert not (tmp_path / "results").exists(), "refused before anything was written"


def test_one_task_converts_too(tiny_run, tmp_path):
    import sharebone.run.eval as sb_eval

    summary = sb_eval.run(eval_cfg(tmp_path, tiny_run, "task=synthetic_images_rgb84",
                                   "convert=auto"))
    assert len(summary["results"]) == 1
