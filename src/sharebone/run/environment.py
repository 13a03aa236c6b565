"""The process a run executes in: CPU threads chosen from the work, float32 matmul
precision, and the known harmless lines of our dependencies silenced.

Threads: How many CPU threads torch uses, chosen from the work.

A tiny model (the sinusoid's 2x40 MLP: 1,761 parameters) gains nothing from intra-op threads:
each op is microseconds, and on a busy machine the threads wait for cores and for each other
(a 2-thread sinusoid run took 17 min under load 3, about 1.5 min with the machine quiet).
Larger backbones (conv4 and up) keep torch's default, one thread per core.
"""

from __future__ import annotations

import logging
import warnings
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


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_float32_matmul_precision(value: str | None, cuda: bool | None = None) -> str | None:
    """Apply the ``float32_matmul_precision`` config key; returns what was set, or ``None``.

    ``auto``: ``high`` (TF32 matmuls) when CUDA is available, the CPU left untouched; ``null``:
    untouched; else one of ``highest``, ``high``, ``medium``
    (:func:`torch.set_float32_matmul_precision`).
    """
    if value is None:
        return None
    if value == "auto":
        if not (torch.cuda.is_available() if cuda is None else cuda):
            return None
        value = "high"
    if value not in MATMUL_PRECISIONS:
        raise SettingError(f"float32_matmul_precision must be auto, null or one of "
                           f"{MATMUL_PRECISIONS}, got {value!r}.")
    torch.set_float32_matmul_precision(value)
    return value


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_known_noise() -> None:
    """Lightning 2.6's LitLogger advert (every trainer) and its use of a torch pytree API that
    torch 2.14 deprecates (every fit): not ours to fix, and not news to a user."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("try installing [litlogger]"))
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is "
                                "deprecated", category=category)
