"""A run directory holds one training run: one process trains in it at a time, a new run never
writes over an old one's checkpoints and results, and a resumed run continues there, with the
run's own task, backbone and regime."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sharebone.errors import ShareboneError

LOCK_NAME = ".sharebone.lock"
#: What must be equal for a resumed run to be the same run (everything else, e.g. the
#: trainer's epochs or the test settings, may change on resume).
SAME_RUN_KEYS = ("task", "backbone", "regime")
#: Task keys that only say where data lives: they may change when a run moves machines.
LOCATION_KEYS = ("data_dir", "cache_dir", "download")


class RunDirError(ShareboneError, RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


class RunLock:
    """An exclusive lock on a run directory for as long as a training runs in it.

    ``fcntl.flock`` on a file in the directory: the OS drops it when the process ends, however
    it ends (``kill -9`` included), so a crashed run never leaves a stale lock behind. The file
    names the holder (pid, host, command), so the refusal can say who.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another training ({holder}). Two runs in one "
                "directory would overwrite each other's checkpoints and results: wait for it, "
                "or give this run its own directory (hydra.run.dir=...).") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_fresh(folder: str | Path) -> None:
    """A new (not resumed) run refuses a directory that already holds a run's checkpoints."""
    found = sorted((Path(folder) / "checkpoints").glob("*.ckpt"))
    if found:
        raise RunDirError(
            f"{folder} already holds another run's checkpoints ({', '.join(p.name for p in found)})"
            f". Continue that run with resume={folder}, or give this run its own directory "
            "(hydra.run.dir=...).")


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/last.ckpt`` -> ``<run>``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
        else checkpoint.parent


#: Overrides never carried over from a run directory's record: where the new process runs
#: and logs (Hydra's own keys), what it resumes, and anything that names code to call.
_NOT_RESTORED = ("hydra.", "hydra/", "resume=", "+resume=")
_CODE_KEYS = ("_target_", "_partial_", "_args_", "_call_", "_recursive_", "_convert_")


def restore_overrides(argv: list[str]) -> list[str]:
    """``sharebone-train resume=<run> [more overrides]`` -> the run's own command-line
    overrides (its ``.hydra/overrides.yaml``) followed by the ones given now (which win), so a
    resumed run is composed as the run was without the user retyping it.

    The record is a file in a folder, so it is read as data: overrides that name code
    (``_target_`` and the like) are not carried over but reported, to be passed again by hand.
    """
    given = [a for a in argv if not a.startswith("-")]
    resume = next((a.split("=", 1)[1] for a in given if a.split("=", 1)[0] in
                   ("resume", "+resume")), None)
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    path = Path(resume).expanduser()
    record = (path if path.is_dir() else run_dir_of(path)) / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return argv
    saved = [o for o in _read_overrides(record) if not o.startswith(_NOT_RESTORED)]
    keys_given = {_key(a) for a in given}
    # A node that names code is left out whole: its other keys would be a callback (say)
    # without its class.
    code_nodes = {_key(o).rpartition(".")[0] for o in saved if any(k in o for k in _CODE_KEYS)}
    restored, skipped = [], []
    for override in saved:
        key = _key(override)
        if key in keys_given:
            continue
        names_code = any(key == n or key.startswith(n + ".") for n in code_nodes if n)
        (skipped if names_code or any(k in override for k in _CODE_KEYS)
         else restored).append(override)
    if skipped:
        print(f"[sharebone] resume: not restoring {skipped} from {record} (they name code to "
              "call); pass them again if the run needs them.")
    if restored:
        print(f"[sharebone] resume: the run's own overrides {restored}")
    return [argv[0], *restored, *argv[1:]]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _read_overrides(record: Path) -> list[str]:
    import yaml

    try:
        saved = yaml.safe_load(record.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [o for o in saved if isinstance(o, str)] if isinstance(saved, list) else []


def _comparable(key: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if k not in ("_target_",)}
    if key == "task" and isinstance(value.get("family"), dict):
        value["family"] = {k: v for k, v in value["family"].items() if k not in LOCATION_KEYS}
    return value


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], source: str,
                   key: str = "resume") -> None:
    """Refuse to resume (``key="resume"``) or test (``key="ckpt_path"``) a run under another
    task, backbone or regime than it was trained with (weights would load, and the run would
    silently train or test something else)."""
    if not saved:
        return
    changed = [k for k in SAME_RUN_KEYS
               if k in saved and _comparable(k, saved[k]) != _comparable(k, current.get(k))]
    if not changed:
        return
    lines = [f"  {k}: the run has {_brief(saved[k])}, this command has {_brief(current.get(k))}"
             for k in changed]
    fix = ("sharebone-train restores the run's own overrides (its .hydra/overrides.yaml); drop "
           "the ones that change these, and change only what may change on resume, e.g. "
           "trainer.max_epochs or test settings." if key == "resume" else
           "Compose the run's own task, backbone and regime (e.g. the experiment= or task= it "
           "was trained with), or score it on any task with sharebone-eval ckpt=... task=....")
    raise RunDirError(
        f"{key}={source} was trained with another {', '.join(changed)} than this command "
        "composes:\n" + "\n".join(lines) + "\n" + fix)


def _brief(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        others = {k: v for k, v in value.items() if k not in ("name", "_target_", "family")}
        return f"{value['name']} {json.dumps(others, default=str)[:300]}"
    return json.dumps(value, default=str)[:300]
