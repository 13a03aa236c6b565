"""keep_freed_memory: freed activation-sized blocks stay in the process for the next task."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sharebone.memory import keep_freed_memory

# What a task's activations do: many mid-sized buffers (here 16 x 4 MB) allocated, written
# and freed together; prints how many MB of them the process gave back to the OS.
PROGRAM = """
import sys, torch
from sharebone.memory import keep_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(3):  # as in training, the same buffers again and again
    buffers = [torch.ones(2**20) for _ in range(16)]
    held = rss()
    del buffers
print((held - rss()) / 2**20)
"""


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="malloc tuning applies to glibc on Linux only")


def released_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


@linux_only
def test_freed_blocks_stay_in_the_process():
    assert released_mb("default") > 32, "glibc gives most of 64 MB of freed buffers back"
    assert released_mb("keep") < 2, "with keep_freed_memory they stay for the next task"


@linux_only
def test_calling_twice_is_harmless():
    assert keep_freed_memory() and keep_freed_memory()
