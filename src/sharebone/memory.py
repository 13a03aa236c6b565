"""Memory: keep what tasks free in the process (CPU runs on Linux/glibc), huge pages for
episodes, and the peak a step allocates.

Meta-training allocates and frees the same large activation buffers for every task of every
meta-batch. With its default settings glibc's ``malloc`` gives big freed blocks back to the
operating system (``munmap``, heap trimming), and the next task page-faults the same amount in
again. Fixing the mmap threshold at its largest value and raising the trim threshold keeps
those blocks for reuse: MAML on conv4 5-way 1-shot meta-batches then trains 1.2-1.4x faster on
a CPU (scripts/bench_maml.py, learn2learn and sharebone alike), ProtoNet's 60-way episodes
1.4-1.6x (``experiment=omniglot_protonet_5w1s`` with ``keep_freed_memory=true|false``). The
peak memory is unchanged; the process simply does not shrink below it while it runs.

:func:`empty_huge` is for the one buffer that is fresh on every call anyway, the episode
sampler's output (68 MB per meta-batch of 32 5-way 5-shot 15-query 84x84x3 episodes):
first-touching it 4 KiB page by page costs more than copying the images into it, and asking
for transparent huge pages (``madvise(MADV_HUGEPAGE)``, 2 MiB pages) removes most of that.

:class:`PeakMemory` measures what a block of code allocates at its peak, on a CPU or a GPU: what
``vmap_chunk_size: auto`` sizes chunks from on a GPU, and how ``scripts/bench_maml.py`` compares
implementations' memory on a CPU as a GPU would count it (tensor bytes, not the process's RSS).
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

from sharebone.errors import SettingError

log = logging.getLogger(__name__)

__all__ = ["PeakMemory", "empty_huge", "keep_freed_memory"]

# glibc's mallopt(3) parameters and the largest values it accepts on 64-bit Linux.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_TRIM_THRESHOLD = 2**31 - 1
MAX_MMAP_THRESHOLD = 32 * 2**20  # blocks above this still come from mmap

MADV_HUGEPAGE = 14  # madvise(2), Linux
HUGE_PAGE = 2 * 2**20  # x86-64 and arm64 (4 KiB base pages)
#: Buffers smaller than this are allocated as they are (few pages to fault in).
HUGE_MIN_BYTES = 8 * HUGE_PAGE
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                _madvise = ctypes.CDLL("libc.so.6").madvise
                _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, backed by transparent huge pages where
    the kernel offers them (Linux, ``transparent_hugepage`` ``always`` or ``madvise``): its
    2 MiB-aligned interior is ``madvise``d before anything touches it, so writing it faults in
    512x fewer pages. Elsewhere, and for small buffers, exactly ``torch.empty``. Memory that
    malloc reuses after a free (see :func:`keep_freed_memory`) keeps the pages it was first
    faulted in with: the advice only helps fresh buffers, such as the sampler's first ones."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel() * out.element_size() >= HUGE_MIN_BYTES and (madvise := _libc_madvise()):
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + out.numel() * out.element_size()) // HUGE_PAGE * HUGE_PAGE
        madvise(start, end - start, MADV_HUGEPAGE)  # advice only: a refusal changes nothing
    return out


def keep_freed_memory() -> bool:
    """Tune glibc's ``malloc`` to keep freed blocks; True if it did (False: not glibc, e.g.
    macOS, Windows or musl, where nothing changes). Affects the whole process; safe to call
    more than once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Setting the mmap threshold also stops glibc from moving
    # it dynamically, which is what keeps the mid-sized activation buffers on the heap.
    done = (mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, MAX_TRIM_THRESHOLD) == 1)
    if not done:
        log.warning("could not tune malloc (mallopt refused); CPU runs may be slower.")
    return done


class PeakMemory:
    """Peak bytes allocated on ``device`` between :meth:`start` and :meth:`bytes_used`, above
    what was allocated at the start; also a context manager (``with PeakMemory(d) as peak:``,
    then ``peak.bytes``).

    On CUDA this is ``torch.cuda.max_memory_allocated`` (cheap, exact). On a CPU it replays the
    allocations and frees that the profiler records (``profile_memory=True``): the same measure
    (tensor memory the allocator handed out, not the process's RSS, so neither malloc's caching
    nor the interpreter shows in it), deterministic for the same work, and with the profiler's
    overhead, so measure a step of its own rather than a timed one. For vmapped MAML on a conv4
    it came within 3% of an H200's ``max_memory_allocated``; a GPU adds a fixed cost it cannot
    see (cuDNN's workspace presumably, 75-95 MiB there).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise SettingError(f"PeakMemory measures cpu and cuda devices, got {self.device}: "
                               "read that device's own allocator statistics instead.")
        self.base, self.bytes = 0, 0
        self._profiler = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def bytes_used(self) -> int:
        """Stop measuring; the peak above the start, in bytes (also kept as ``bytes``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return self.bytes
        if self._profiler is None:
            raise RuntimeError("PeakMemory.bytes_used() before start().")
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        # Allocations (+) and frees (-) in time order; a block allocated before start() and
        # freed inside is not reported by the profiler, so it cannot push the sum below zero.
        events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results
                        .events() if e.name() == "[memory]"
                        and e.device_type() == torch._C._autograd.DeviceType.CPU)
        now = peak = 0
        for _, nbytes in events:
            now += nbytes
            peak = max(peak, now)
        self.bytes = peak
        return peak

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes_used()
