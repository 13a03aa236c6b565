"""The errors sharebone raises on purpose, the checks on plain settings that raise them, and
how the console scripts report them.

Every check that refuses a setting, a data file, a checkpoint or a run directory raises a
:class:`ShareboneError` whose message names the key to change, says what was wrong and how to
fix it. The console scripts print that message once, as ``sharebone-train: error: <message>``,
and exit with status 2 (a usage error), without a traceback: the traceback is sharebone's
business, the message is the user's. ``HYDRA_FULL_ERROR=1`` (or ``SHAREBONE_DEBUG=1``) shows
the traceback as well. Anything else (a bug, an error from torch) keeps its traceback.

Each class also derives from the builtin a caller would catch (:class:`SettingError` is a
``ValueError``), so ``except ValueError`` around a sharebone call keeps working.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

#: The exit status of a run refused for a user's mistake (argparse's, for a usage error).
USAGE_EXIT = 2
#: Environment variables that ask for the whole traceback instead of the one line.
DEBUG_ENV = ("HYDRA_FULL_ERROR", "SHAREBONE_DEBUG")


class ShareboneError(Exception):
    """A mistake in what sharebone was given; the message says which key, what and how to fix."""


class SettingError(ShareboneError, ValueError):
    """A setting (a config key, an argument) that cannot be used as given."""


class UnknownNameError(SettingError, KeyError):
    """A name (a regime, backbone, family, split) that nothing is registered as."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def refused_pickle(err: BaseException) -> str | None:
    """When ``err`` is ``torch.load(..., weights_only=True)`` refusing a file for naming code
    (a pickle runs whatever callable it names), why, in words for the user, else None. torch's own
    message advises loading it again with ``weights_only=False``: for a file that just failed
    the safe load, that is the one thing not to do."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found is None:  # an opcode the safe unpickler has no use for: bytes, not code
        return ("its bytes are not a checkpoint torch.save wrote (corrupt, truncated, or another "
                "kind of file), so nothing was loaded. Point at a .ckpt written by "
                "sharebone-train.")
    return (f"it holds code or Python objects, not only tensors and plain values (it asks for "
            f"{found.group(1).rstrip('.')}), and loading it could run any code, so nothing was "
            "loaded. A file sharebone wrote never holds code: if you made this one, save its "
            "tensors (a state_dict) instead; otherwise delete it.")


def user_error(err: BaseException) -> ShareboneError | None:
    """The outermost :class:`ShareboneError` in ``err``'s chain (``err`` itself, or what it
    was raised from: Hydra's ``instantiate`` wraps what a constructor raised), else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ShareboneError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def debugging() -> bool:
    """Whether the user asked for whole tracebacks (:data:`DEBUG_ENV`)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_ENV)


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Around a console script's run: a :class:`ShareboneError` (or an exception raised from
    one) is printed once as ``<prog>: error: <message>`` and exits :data:`USAGE_EXIT`."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if found is None or debugging():
            raise
        print(f"{prog}: error: {found}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT) from None


def check_count(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int, refusing anything that is not a whole number ``>= low``.

    Example:
        >>> check_count("k_shot", 5)
        5
        >>> check_count("n_way", "abc")
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: n_way must be an integer >= 1, got 'abc'.
    """
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not (whole or (isinstance(value, float) and value.is_integer())) or value < low:
        raise SettingError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)
