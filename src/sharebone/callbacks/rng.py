"""The random state in checkpoints, for an exact resume."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class RNGState(pl.Callback):
    """Saves and restores torch's CPU (and CUDA) generators with each checkpoint.

    The episodes do not need it (episode ``i`` is a pure function of the seed and ``i``), but
    dropout, random augmentation or any other draw in a regime does for an exact resume.
    The states are uint8 tensors, so the checkpoint still loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
