"""keep_freed_memory: activation-sized blocks come from the heap and stay there when freed;
empty_huge: the sampler's fresh buffers on transparent huge pages."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharebone.memory import PeakMemory, empty_huge, keep_freed_memory

# One 24 MB buffer (a conv4 activation of a 20-way query set) in a fresh process: prints
# whether malloc served it with its own mmap, and how many MB freeing it gave back to the OS.
PROGRAM = """
import ctypes, sys, torch
from sharebone.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "keep":
    assert keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
block = torch.ones(6 * 2**20)
own_mmap = libc.mallinfo2().hblkhd - mapped >= 24 * 2**20
held = rss()
del block
print(int(own_mmap), (held - rss()) / 2**20)
"""


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def allocate_and_free(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True)
    own_mmap, released = out.stdout.split()
    return own_mmap == "1", float(released)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not has_mallinfo2(),
                    reason="malloc tuning applies to glibc (>= 2.33 to inspect it) on Linux only")
def test_activation_sized_blocks_come_from_the_heap_and_stay():
    own_mmap, released = allocate_and_free("default")
    assert own_mmap and released > 20, "by default glibc maps such a block and unmaps it"
    own_mmap, released = allocate_and_free("keep")
    assert not own_mmap and released < 2, "kept: served from the heap, not trimmed when freed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux-only")
def test_calling_twice_is_harmless():
    assert keep_freed_memory() and keep_freed_memory()


def thp_mode() -> str | None:
    """The kernel's transparent huge page setting (``always``, ``madvise``, ``never``)."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds ``address``."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_empty_huge_is_torch_empty_for_every_use():
    for shape, dtype in (((3, 4), torch.uint8), ((2, 3, 84, 84), torch.float32),
                         ((4096, 3, 84, 84), torch.uint8)):
        t = empty_huge(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        t.fill_(7)
        assert int(t.sum()) == 7 * t.numel()


HUGE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_memory import huge_kb, thp_mode
from sharebone.memory import empty_huge
size = 64 * 2**20
middle = size // 2  # madvise splits off the 2 MiB-aligned interior as its own mapping
huge = empty_huge((size,)).fill_(1)
plain = torch.empty(size, dtype=torch.uint8).fill_(1)
print(huge_kb(huge.data_ptr() + middle), huge_kb(plain.data_ptr() + middle))
"""


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                    reason=f"transparent huge pages are {thp_mode()!r} in this kernel")
def test_empty_huge_buffers_are_backed_by_huge_pages():
    # In a fresh process, as the sampler's buffers are: memory that malloc hands back after a
    # free was already faulted in with 4 KiB pages, and advice cannot change those.
    out = subprocess.run([sys.executable, "-c", HUGE, str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True)
    huge, plain = map(int, out.stdout.split())
    assert huge >= 2048  # at least one 2 MiB page
    if thp_mode() == "madvise":  # only advised memory gets them
        assert plain == 0


MiB = 2**20


def test_peak_memory_counts_what_was_allocated_at_once_above_the_start():
    before = torch.ones(2 * MiB // 4)  # allocated before: neither counted nor, freed, subtracted
    with PeakMemory("cpu") as peak:
        a = torch.ones(4 * MiB // 4)
        b = torch.ones(MiB // 4)
        del a, before  # 5 MiB were alive at once; then 1 MiB
        c = torch.ones(3 * MiB // 4)
        del b, c
    assert 5 * MiB <= peak.bytes < 5 * MiB + 64 * 1024


def test_peak_memory_of_a_backward_pass_counts_the_saved_activations():
    """A chain of 8 out-of-place ops keeps each input for the backward pass: 8 activations of
    1 MiB alive at once, then freed; the same ops without a graph hold about two at a time."""
    x = torch.rand(MiB // 4, requires_grad=True)

    def chain():
        y = x
        for _ in range(8):
            y = y.sin()
        return y.sum()

    with PeakMemory() as kept:
        chain().backward()
    with torch.no_grad(), PeakMemory() as plain:
        chain()
    assert kept.bytes >= 8 * MiB and plain.bytes <= 3 * MiB


def test_peak_memory_refuses_a_reading_before_it_started_and_devices_it_cannot_read():
    with pytest.raises(RuntimeError, match="before start"):
        PeakMemory("cpu").bytes_used()
    with pytest.raises(ValueError, match="cpu and cuda devices, got mps"):
        PeakMemory("mps")
