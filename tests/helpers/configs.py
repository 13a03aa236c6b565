"""The real configs, shrunk to seconds, for tests that run real training."""

from __future__ import annotations

from pathlib import Path

from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.utils import setup_globals
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig

from sharebone.config import CONFIG_DIR, compose_config

REPO_ROOT = Path(__file__).resolve().parents[2]

#: A few seconds of training on generated images: every part real, nothing downloaded.
FAST = ["task=synthetic_images", "debug=fast", "logger=none"]


def compose_train(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real train/eval config with overrides, its paths pointed at ``tmp_path``."""
    return compose_config(overrides, tmp_path, config_name=config_name, root_dir=REPO_ROOT)


def hydra_context(overrides: list[str]) -> tuple[DictConfig, HydraContext]:
    """What Hydra builds before it launches a multirun: the config (its hydra node too) and
    the context a sweeper or launcher is made with."""
    setup_globals()  # the ${now:} resolver, as Hydra registers it
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    cfg = loader.load_configuration("train", overrides=overrides, run_mode=RunMode.MULTIRUN)
    return cfg, HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
