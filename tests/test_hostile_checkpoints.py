"""Hostile checkpoints: a file that loads safely must not run code through its contents.

Issue 9, security items 1 and 2: the saved config is data (never instantiated), and every load
path passes ``weights_only=True`` explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot
turn a resume into running a pickle.
"""

from __future__ import annotations

import pytest
import torch
from helpers.configs import FAST, compose_train
from helpers.crafted import pickle_bomb

from sharebone.checkpoint_io import AtomicCheckpointIO, CheckpointError
from sharebone.data.families import UnsafeConfigError, build_family
from sharebone.run import eval as sb_eval
from sharebone.run.train import run


def crafted_family(victim) -> dict:
    """What the sweep used: print into a file the attacker chose (opened for appending)."""
    return {"_target_": "builtins.print", "_args_": ["export PATH=/evil:$PATH"],
            "file": {"_target_": "builtins.open", "file": str(victim), "mode": "a"}}


def with_saved_task_family(tiny_run, tmp_path, family: dict):
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["sharebone"]["config"]["task"]["family"] = family
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path


def test_eval_never_instantiates_a_family_saved_in_a_checkpoint(tiny_run, tmp_path):
    victim = tmp_path / "bashrc"
    path = with_saved_task_family(tiny_run, tmp_path, crafted_family(victim))
    cfg = compose_train(tmp_path, [f"ckpt={path}", "episodes=2", f"output_dir={tmp_path}"],
                        config_name="eval")
    with pytest.raises(UnsafeConfigError, match="'builtins.print' is not a registered"):
        sb_eval.run(cfg)
    assert not victim.exists()


def test_a_registered_family_with_a_nested_target_is_refused_too(tiny_run, tmp_path):
    victim = tmp_path / "bashrc"
    family = {"_target_": "sharebone.data.tasks.SyntheticImageTasks",
              "classes": {"train": 8, "test": 8},
              "seed": {"_target_": "builtins.open", "file": str(victim), "mode": "a"}}
    path = with_saved_task_family(tiny_run, tmp_path, family)
    cfg = compose_train(tmp_path, [f"ckpt={path}", "episodes=2", f"output_dir={tmp_path}"],
                        config_name="eval")
    with pytest.raises(UnsafeConfigError, match=r"task.family.seed has the key '_target_'"):
        sb_eval.run(cfg)
    assert not victim.exists()


def test_eval_rebuilds_the_saved_registered_family_from_plain_values(tiny_run, tmp_path):
    cfg = compose_train(tmp_path, [f"ckpt={tiny_run}", "episodes=2", f"output_dir={tmp_path}",
                                   "settings=[{n_way: 5, k_shot: 1}]"], config_name="eval")
    assert [r["episodes"] for r in sb_eval.run(cfg)["results"]] == [2]


def test_a_users_own_config_may_name_its_own_family_class():
    family = build_family({"_target_": "sharebone.data.tasks.SyntheticImageTasks",
                           "classes": {"train": 6}})
    assert family.family_name == "synthetic_images"


def test_resume_never_runs_a_pickle_even_when_the_environment_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    victim = tmp_path / "bashrc"
    bomb = pickle_bomb(tmp_path / "last.ckpt", victim)
    cfg = compose_train(tmp_path / "run", FAST + [f"resume={bomb}"])
    with pytest.raises(CheckpointError, match="Cannot resume.*Could not read checkpoint"):
        run(cfg)
    assert not victim.exists()


def test_lightning_load_path_is_weights_only_whatever_the_caller_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    victim = tmp_path / "bashrc"
    bomb = pickle_bomb(tmp_path / "last.ckpt", victim)
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointError, match=r"holds code.*nothing was loaded"):
        io.load_checkpoint(bomb)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        io.load_checkpoint(bomb, weights_only=False)
    assert not victim.exists()
