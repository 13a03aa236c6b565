"""How many tasks of a meta-batch to vmap at once (``regime.vmap_chunk_size``).

A vmapped meta-batch holds every task's graph until its meta-gradient is taken; in chunks of
``k`` tasks, each chunk's meta-gradient taken as soon as the chunk is done, it holds one
chunk's. :func:`chunk_slices` cuts a meta-batch (a short last chunk when ``k`` does not divide
it); :func:`auto_chunk_size` is the estimate behind ``vmap_chunk_size: auto``.

The estimate is deliberately simple (made once per episode shape, at the first meta-batch):
run the first chunk as one task, read the peak memory it
allocated above what was allocated before it (``bytes_per_task``), and fit as many tasks as
``headroom`` (0.8) of the memory free after it allows::

    k = clamp(floor(headroom * free_bytes / bytes_per_task), 1, tasks left)

with ``free_bytes`` the device's free memory (:func:`torch.cuda.mem_get_info`) plus what
PyTorch's caching allocator holds but does not use. A vmapped chunk of ``k`` tasks costs
about ``k`` times one task (activations scale with the tasks; the parameters are shared), so
the estimate errs on the safe side by the parameters' share. On CPU nothing is measured: the
whole meta-batch is one chunk (vmap is opt-in there and host memory is rarely its limit).
"""

from __future__ import annotations

import math

import torch

from sharebone.errors import SettingError

__all__ = ["HEADROOM", "auto_chunk_size", "chunk_slices", "free_device_bytes"]

#: Share of the free memory the chunks of ``vmap_chunk_size: auto`` may fill.
HEADROOM = 0.8


def chunk_slices(num_tasks: int, size: int) -> list[slice]:
    """Consecutive chunks of ``size`` tasks covering ``num_tasks``; the last one shorter when
    ``size`` does not divide ``num_tasks``.

    Example:
        >>> [(s.start, s.stop) for s in chunk_slices(10, 4)]
        [(0, 4), (4, 8), (8, 10)]
    """
    if size < 1:
        raise SettingError(f"chunk size must be >= 1, got {size}.")
    return [slice(start, min(start + size, num_tasks)) for start in range(0, num_tasks, size)]


def auto_chunk_size(free_bytes: int, bytes_per_task: int, num_tasks: int,
                    headroom: float = HEADROOM) -> int:
    """Tasks per chunk that fit in ``headroom * free_bytes`` at ``bytes_per_task`` each,
    between 1 and ``num_tasks``.

    Example:
        >>> auto_chunk_size(free_bytes=10_000, bytes_per_task=1_000, num_tasks=32)  # 8000 / 1000
        8
        >>> auto_chunk_size(10_000, 0, 32), auto_chunk_size(500, 1_000, 32)
        (32, 1)
    """
    if num_tasks < 1:
        raise SettingError(f"num_tasks must be >= 1, got {num_tasks}.")
    if bytes_per_task <= 0:
        return num_tasks
    fit = math.floor(headroom * max(free_bytes, 0) / bytes_per_task)
    return max(1, min(num_tasks, fit))


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a chunk could still use on ``device``: free device memory plus what the caching
    allocator holds unused; ``None`` off CUDA (nothing to measure)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
