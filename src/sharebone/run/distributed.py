"""Which process of a distributed launch this is, read from the environment before anything
heavy is imported (the command-line entry points need it before Lightning exists)."""

from __future__ import annotations

import os

#: Set by rank 0 while it trains: the resolved config of the run. DDP ranks that Lightning
#: starts as new processes (``strategy=ddp`` re-runs the command line) read it instead of
#: composing the config again: same run directory, same settings, no second sweep.
RUN_CONFIG_ENV = "SHAREBONE_RUN_CONFIG"


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 when nothing did).

    Known before the trainer exists, so that only rank 0 starts a W&B run: torchrun sets
    ``RANK``, SLURM ``SLURM_PROCID``, Lightning's own launcher ``NODE_RANK``/``LOCAL_RANK``.
    """
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return local if node == 0 else node * max(per_node, local + 1) + local


def handed_config() -> str | None:
    """The resolved config rank 0 handed this process, when it is a rank Lightning started."""
    handed = os.environ.get(RUN_CONFIG_ENV)
    return handed if handed and launch_rank() != 0 else None
