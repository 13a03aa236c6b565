"""Where the Hydra configs live, the few resolvers they use, and composing them from Python."""

from __future__ import annotations

import math
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

#: The repository's configs/ (task families come from tasks/, linked in as the ``task`` group).
CONFIG_DIR = Path(os.environ.get("SHAREBONE_CONFIG_DIR",
                                 Path(__file__).resolve().parents[2] / "configs"))


def register_resolvers() -> None:
    """``${sb.mul:a,b,...}``: a product, e.g. an MLP's input size from channels and image size."""
    if not OmegaConf.has_resolver("sb.mul"):
        OmegaConf.register_new_resolver("sb.mul", lambda *xs: math.prod(int(x) for x in xs))


register_resolvers()


def compose_config(overrides: list[str], output_dir: str | Path, config_name: str = "train",
                   root_dir: str | Path | None = None) -> DictConfig:
    """The config a Hydra app would receive for ``overrides``, its outputs in ``output_dir``.

    For calling ``sharebone.train.run`` / ``sharebone.eval.run`` from Python (scripts, tests,
    notebooks) without the command line: the same composition, the same groups and overrides.
    """
    root = Path(root_dir) if root_dir is not None else CONFIG_DIR.parent
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(root)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as an app receives it: the hydra node lives in HydraConfig
    return cfg
