"""How many CPU threads torch uses, chosen from the work.

A tiny model (the sinusoid's 2x40 MLP: 1,761 parameters) gains nothing from intra-op threads:
each op is microseconds, and on a busy machine the threads wait for cores and for each other
(a 2-thread sinusoid run took 17 min under load 3, about 1.5 min with the machine quiet).
Larger backbones (conv4 and up) keep torch's default, one thread per core.
"""

from __future__ import annotations

from typing import Any

import torch

from sharebone.errors import SettingError

#: Below this many parameters a model trains on one thread (``threads: auto``).
SMALL_MODEL = 100_000


def choose_threads(setting: Any, model: torch.nn.Module) -> int:
    """Apply ``threads`` (``auto``, or a number >= 1) and return the count torch now uses.

    Example:
        >>> before = torch.get_num_threads()
        >>> choose_threads("auto", torch.nn.Linear(40, 40))
        1
        >>> torch.set_num_threads(before)
    """
    if setting in (None, "auto"):
        if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
            torch.set_num_threads(1)
        return torch.get_num_threads()
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise SettingError(f"threads must be 'auto' or an integer >= 1, got {setting!r}.")
    torch.set_num_threads(setting)
    return setting
