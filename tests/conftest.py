"""Shared fixtures: the real configs shrunk to seconds, generated data, the real data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.configs import FAST, compose_train
from helpers.data import *  # noqa: F401,F403  (fake_omniglot, fake_omniglot_mirror, shared_data_dir)
from helpers.data import SHARED_DATA
from omegaconf import DictConfig


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Under pytest-xdist (``make test``: two workers on two cores) each worker computes on
    one thread, so the two do not fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _hermetic_env(tmp_path_factory: pytest.TempPathFactory):
    """Decoded-data cache in a temp folder; W&B never tries the network from tests."""
    old = {k: os.environ.get(k) for k in ("SHAREBONE_CACHE_DIR", "WANDB_MODE", "WANDB_SILENT")}
    os.environ["SHAREBONE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def fast_cfg(tmp_path: Path) -> DictConfig:
    return compose_train(tmp_path, FAST)


@pytest.fixture
def real_data_dir() -> Path:
    if not (SHARED_DATA / "omniglot" / "images_background_small1.zip").is_file():
        pytest.skip(f"real Omniglot archives not found at {SHARED_DATA}/omniglot (the project's "
                    "shared data; CI has it, a user's clone may not)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished training run (ProtoNet, generated images, seconds), read-only for tests."""
    from sharebone.run.train import run

    out = tmp_path_factory.mktemp("tiny_run")
    run(compose_train(out, FAST + ["sampler.batches_per_epoch=2", "test.episodes=2",
                                   "test.settings=[{n_way: 5, k_shot: 1}]"]))
    return out
