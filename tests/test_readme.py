"""The README's Python API example runs as written (every ``>>>`` line of README.md)."""

from __future__ import annotations

import doctest
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_examples_run_as_written():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on a busy CPU
    try:
        result = doctest.testfile(str(README), module_relative=False,
                                  optionflags=doctest.ELLIPSIS, report=True)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted >= 20  # the Python API example is there, and was run
    assert result.failed == 0, "a README example fails; see the captured output above"
