"""Where the Hydra configs live, and the few resolvers they use."""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import OmegaConf

#: The repository's configs/ (task families come from tasks/, linked in as the ``task`` group).
CONFIG_DIR = Path(os.environ.get("SHAREBONE_CONFIG_DIR",
                                 Path(__file__).resolve().parents[2] / "configs"))


def register_resolvers() -> None:
    """``${sb.mul:a,b,...}``: a product, e.g. an MLP's input size from channels and image size."""
    if not OmegaConf.has_resolver("sb.mul"):
        OmegaConf.register_new_resolver("sb.mul", lambda *xs: math.prod(int(x) for x in xs))


register_resolvers()
