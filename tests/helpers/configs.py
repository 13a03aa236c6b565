"""The real configs, shrunk to seconds, for tests that run real training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sharebone.config import compose_config

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A few seconds of training on generated images: every part real, nothing downloaded.
FAST = ["task=synthetic_images", "debug=fast", "logger=none"]


def compose_train(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real train/eval config with overrides, its paths pointed at ``tmp_path``."""
    return compose_config(overrides, tmp_path, config_name=config_name, root_dir=REPO_ROOT)
