"""Where the Hydra configs live, the few resolvers they use, and composing them from Python."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict


def _own_config_dir() -> Path:
    """sharebone's own configs: the repository's ``configs/`` in a source checkout (``tasks/``
    linked in as its ``task`` group), else the copy a wheel ships as ``sharebone/conf``."""
    checkout = Path(__file__).resolve().parents[2] / "configs"
    return checkout if (checkout / "train.yaml").is_file() else Path(__file__).parent / "conf"


#: sharebone's own configs (and, under ``task/``, the task families and their split files).
OWN_CONFIG_DIR = _own_config_dir()
#: The primary config folder of ``sharebone-train``/``sharebone-eval``: sharebone's own, or a
#: whole replacement named by ``$SHAREBONE_CONFIG_DIR``. To add configs beside sharebone's
#: instead, put them in a folder of groups (``my_configs/task/my_task.yaml``) and pass
#: ``hydra.searchpath=[file:///abs/path/my_configs]``.
CONFIG_DIR = Path(os.environ.get("SHAREBONE_CONFIG_DIR", OWN_CONFIG_DIR))


def register_resolvers() -> None:
    """``${sb.mul:a,b,...}``: a product, e.g. an MLP's input size from channels and image size."""
    if not OmegaConf.has_resolver("sb.mul"):
        OmegaConf.register_new_resolver("sb.mul", lambda *xs: math.prod(int(x) for x in xs))


register_resolvers()

_INTERPOLATION = re.compile(r"(\\*)\$\{")


def escape_interpolations(value: Any) -> Any:
    r"""``value`` (a string, or dicts and lists of them) with every ``${`` escaped, so that
    OmegaConf, reading it as config, keeps it as written instead of interpolating it.

    A value taken from outside the config (a path, an environment variable) may contain ``${``:
    ``SHAREBONE_DATA_DIR=/data/${USER}`` taken literally by the shell, a folder named so. The
    first resolution of ``${oc.env:...}`` keeps it literal, but a resolved config that is read
    as config again (a DDP rank reading the one rank 0 wrote) would parse it; escaped, it reads
    back as the very same string.

    Example:
        >>> escape_interpolations({"data_dir": "/tmp/a${b}", "n": 1})
        {'data_dir': '/tmp/a\\${b}', 'n': 1}
    """
    if isinstance(value, str):
        # OmegaConf: "\${" is a literal "${"; backslashes right before it are doubled.
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(escape_interpolations(v) for v in value)
    return value


def compose_config(overrides: list[str], output_dir: str | Path, config_name: str = "train",
                   root_dir: str | Path | None = None) -> DictConfig:
    """The config a Hydra app would receive for ``overrides``, its outputs in ``output_dir``.

    For calling ``sharebone.run.train.run`` / ``sharebone.run.eval.run`` from Python (scripts,
    tests,
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
