"""The console scripts ``sharebone-train`` and ``sharebone-eval``.

Hydra parses the command line here, before torch or Lightning is imported, so that
``--help``, ``--cfg job`` and a mistyped override (with its "did you mean",
:mod:`sharebone.run.suggest`) answer in about a second; the run itself
(:func:`sharebone.run.train.run`, :func:`sharebone.run.eval.run`) is imported only when there is
one.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from sharebone.config import CONFIG_DIR
from sharebone.errors import reported
from sharebone.run import suggest
from sharebone.run.distributed import handed_config
from sharebone.run.run_dir import restore_overrides


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    """One training run; returns what a Hydra sweeper optimises (see ``objective``)."""
    from sharebone.run.train import check_objective, objective, run

    with reported("sharebone-train"):
        check_objective(cfg)
        return objective(cfg, run(cfg))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def eval_app(cfg: DictConfig) -> None:
    """Score one checkpoint (see :mod:`sharebone.run.eval`)."""
    from hydra.core.hydra_config import HydraConfig

    from sharebone.run.eval import run
    from sharebone.run.run_dir import write_record

    write_record(HydraConfig.get().runtime.output_dir, OmegaConf.to_yaml(cfg))
    with reported("sharebone-eval"):
        run(cfg)


def train() -> float | None:
    """``sharebone-train``: a Hydra app, except in a DDP rank that rank 0 started (that rank
    runs the very config rank 0 resolved instead of composing its own)."""
    handed = handed_config()
    if handed:
        from sharebone.run.train import run

        logging.basicConfig(level=logging.INFO)
        with reported("sharebone-train"):
            run(OmegaConf.load(handed))
        sys.exit(0)
    sys.argv = restore_overrides(sys.argv)
    with suggest.on_failure(sys.argv[1:], "train"):
        return train_app()


def evaluate() -> None:
    """``sharebone-eval``."""
    with suggest.on_failure(sys.argv[1:], "eval"):
        eval_app()
