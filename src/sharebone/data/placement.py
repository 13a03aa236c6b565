"""Where a split's images live while episodes are drawn: on the host, or on the model's GPU.

On a GPU, drawing a meta-batch from host memory costs a host-to-device copy every step (68 MB
for 32 episodes of 5-way 5-shot 15-query at 84x84x3); with the split's uint8 images resident
on the GPU the sampler indexes them there and nothing crosses the bus. Omniglot's background
set is 19 MB at 28x28, miniImageNet's training split 1 GB at 84x84x3: both fit on any
training GPU, tieredImageNet's 12.5 GB only on large ones. ``images_on_device``:

- ``auto``: on the GPU when the split takes at most :data:`AUTO_FRACTION` of its free memory
  and the loader has no worker processes (which cannot share CUDA tensors), else the host;
- ``true``: on the GPU if it fits at all (else the host, with a warning saying why);
- ``false``: the host.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sharebone.errors import SettingError

#: ``auto`` keeps three quarters of free GPU memory for the model, its meta-batch and vmap.
AUTO_FRACTION = 0.25


def check_policy(images_on_device: Any) -> str | bool:
    """``auto``, ``True`` or ``False`` (YAML's spellings of them too), or a clear error."""
    if isinstance(images_on_device, bool):
        return images_on_device
    word = str(images_on_device).lower() if isinstance(images_on_device, str) else None
    if word in ("auto", "true", "false"):
        return "auto" if word == "auto" else word == "true"
    raise SettingError(f"sampler.images_on_device must be auto, true or false, got "
                       f"{images_on_device!r}.")


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA); 0 where it cannot be asked."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 0


def place_source(source: Any, device: torch.device, images_on_device: str | bool,
                 num_workers: int = 0, free_bytes: int | None = None) -> Any:
    """``source`` moved to ``device`` when ``images_on_device`` says so (see the module), else
    ``source`` itself. Only samplers that can move (``EpisodeSampler.to``) ever are; sources
    that generate their episodes (the sinusoid) have nothing to move.

    Raises:
        ValueError: ``images_on_device=true`` with loader worker processes.
    """
    policy = check_policy(images_on_device)
    if policy is False or device.type == "cpu" or not hasattr(source, "nbytes"):
        return source
    if num_workers > 0:
        if policy is True:
            raise SettingError(
                f"sampler.images_on_device=true and sampler.num_workers={num_workers}: worker "
                "processes cannot draw episodes from GPU memory. Set sampler.num_workers=0 "
                "(episodes drawn on the GPU need no workers) or images_on_device=false.")
        return source
    free = free_memory(device) if free_bytes is None else free_bytes
    limit = AUTO_FRACTION * free if policy == "auto" else free
    if source.nbytes > limit:
        if policy is True:
            warnings.warn(
                f"sampler.images_on_device=true, but the {source.split!r} split's images "
                f"({source.nbytes / 2**30:.2f} GiB) do not fit in the {free / 2**30:.2f} GiB "
                f"free on {device}: episodes are drawn on the host instead.", stacklevel=2)
        return source
    return source.to(device)
