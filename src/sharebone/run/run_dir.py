"""A run directory holds one training run: one process trains in it at a time, a new run never
writes over an old one's checkpoints and results, and a resumed run continues there, with the
run's own task, backbone and regime."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharebone.data.families import named_spec
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


#: Where a run's record (config, Hydra's config, the command-line overrides) is kept.
RECORD_DIR = ".hydra"


def write_record(folder: str | Path, config_yaml: str) -> None:
    """The run's record in ``folder``/.hydra, as Hydra would write it (``config.yaml``,
    ``hydra.yaml``, ``overrides.yaml``), written by sharebone once the run has been accepted:
    a run refused from a directory (it is busy, or holds another run) leaves that
    directory's record as it was (``hydra.output_subdir`` is null, so Hydra writes none)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from sharebone.files import atomic_write

    files = {"config.yaml": config_yaml}
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        files["hydra.yaml"] = OmegaConf.to_yaml({"hydra": hydra})
        files["overrides.yaml"] = OmegaConf.to_yaml(hydra.overrides.task)
    for name, text in files.items():
        with atomic_write(Path(folder) / RECORD_DIR / name, "w") as f:
            f.write(text)


def remove_if_empty(folder: str | Path) -> None:
    """Remove ``folder`` if it is empty, and its empty parents inside the working directory
    (a refused run leaves no ``outputs/<date>/<time>/`` behind)."""
    folder, cwd = Path(folder).resolve(), Path.cwd().resolve()
    while folder != cwd:
        try:
            folder.rmdir()
        except OSError:  # not empty, not ours to remove, or gone
            return
        if cwd not in folder.parents:
            return
        folder = folder.parent


def check_fresh(folder: str | Path) -> None:
    """A new (not resumed) run refuses a directory that already holds a run's checkpoints."""
    found = sorted((Path(folder) / "checkpoints").glob("*.ckpt"))
    if found:
        raise RunDirError(
            f"{folder} already holds another run's checkpoints ({', '.join(p.name for p in found)})"
            f". Continue that run with resume={folder}, or give this run its own directory "
            "(hydra.run.dir=...).")


#: What a run directory's record may bring back on resume: plain values of these keys and
#: the keys below them ...
RESTORED_KEYS = ("task", "backbone", "regime", "sharing", "optimizer", "scheduler", "sampler",
                 "trainer", "test", "checkpoint", "figures", "seed", "tags", "keep_freed_memory",
                 "float32_matmul_precision", "threads", "on_nonfinite_loss", "nonfinite_check",
                 "sweep_name", "objective", "data_dir")
#: ... and choices of these config groups, by name (sharebone's own config files). Nothing
#: that instantiates (the keys of callbacks and logger), says where the process writes
#: (hydra, paths, cache_dir) or what it loads (ckpt_path) comes from a file.
RESTORED_GROUPS = ("task", "backbone", "regime", "sharing", "optimizer", "scheduler",
                   "sampler", "trainer", "experiment", "logger", "callbacks", "debug")
_CODE_KEYS = ("_target_", "_partial_", "_args_", "_call_", "_recursive_", "_convert_")
#: A config group option's name: a file of the group (no path, nothing hidden).
_OPTION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def restore_overrides(argv: list[str]) -> list[str]:
    """``sharebone-train resume=<run> [more overrides]`` -> the run's own command-line
    overrides (its ``.hydra/overrides.yaml``) followed by the ones given now (which win), so a
    resumed run is composed as the run was without the user retyping it.

    The record is a file in a folder someone may have handed over, so it is read as data:
    only plain settings come back (:func:`restorable`: an allow-list of keys, group choices
    by name, values without interpolations or resolvers, no new keys). The rest is reported,
    to be passed again by hand if the run needs it.
    """
    given = [a for a in argv if not a.startswith("-")]
    resume = next((a.split("=", 1)[1] for a in given if a.split("=", 1)[0] in
                   ("resume", "+resume")), None)
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    from sharebone.checkpoint_io import run_dir_of  # torch: only once there is a resume

    path = Path(resume).expanduser()
    record = (path if path.is_dir() else run_dir_of(path)) / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return argv
    keys_given = {_key(a) for a in given}
    restored, dropped = [], []
    for override in read_overrides(record):
        reason = restorable(override)
        if reason is None and _key(override) not in keys_given:
            restored.append(override)
        elif reason is not None and _root(_key(override)) not in ("hydra", "resume"):
            dropped.append(f"{override} ({reason})")  # where this process runs: not news
    if dropped:
        print(f"[sharebone] resume: not restoring from {record}: {'; '.join(dropped)}. A run "
              "record is data: pass them again on the command line if the run needs them.")
    if restored:
        print(f"[sharebone] resume: the run's own overrides {restored}")
    return [argv[0], *restored, *argv[1:]]


def restorable(override: str) -> str | None:
    """None if a recorded ``override`` may be restored, else why not.

    Example:
        >>> restorable("regime.lr=0.01"), restorable("task=omniglot_small")
        (None, None)
        >>> restorable("tags=['${oc.env:SECRET,none}']")
        'an interpolation or resolver (${...}) in the value'
        >>> restorable("+callbacks.x._target_=builtins.print")
        'names code to call'
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "${" in override:
        return "an interpolation or resolver (${...}) in the value"
    if any(k in override for k in _CODE_KEYS):
        return "names code to call"
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception:  # noqa: BLE001 - Hydra's grammar refused it; the reason is not ours
        return "not a valid override"
    key = parsed.key_or_group
    if parsed.package is not None or parsed.is_add() or parsed.is_force_add() \
            or parsed.is_delete():
        return "adds, deletes or repackages a key"
    if parsed.is_sweep_override() or parsed.value_type is not None and \
            parsed.value_type.name not in ("ELEMENT",):
        return "a sweep"
    if key in RESTORED_GROUPS:
        return None if _names_options(parsed.value()) else "a group choice that is not a name"
    if _root(key) not in RESTORED_KEYS or "/" in key:
        return f"{_root(key)} is not a setting restored on resume"
    return None


def _names_options(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(v is None or isinstance(v, str) and _OPTION_NAME.fullmatch(v) for v in values)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _root(key: str) -> str:
    """The top-level key or group of ``key`` (``hydra.run.dir``, ``hydra/launcher``: hydra)."""
    return re.split(r"[./@]", key, maxsplit=1)[0]


def read_overrides(record: Path) -> list[str]:
    """A run's ``.hydra/overrides.yaml`` as the strings it holds, read as YAML data: never as
    config (OmegaConf would resolve a ``${oc.env:...}`` in it), [] if it is unreadable."""
    import yaml

    try:
        saved = yaml.safe_load(record.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [o for o in saved if isinstance(o, str)] if isinstance(saved, list) else []


def _differs(key: str, saved: Any, current: Any) -> bool:
    """Whether a run's ``key`` changed: a backbone by the one rule for "the same backbone"
    (:func:`~sharebone.models.backbones.backbone_differences`), the rest as plain values."""
    if key == "backbone" and isinstance(saved, dict) and isinstance(current, dict):
        from sharebone.models.backbones import backbone_differences  # torch: only on resume

        return bool(backbone_differences(_comparable(key, current), _comparable(key, saved)))
    return _comparable(key, saved) != _comparable(key, current)


def _comparable(key: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if k not in ("_target_",)}
    if key == "task" and isinstance(value.get("family"), dict):
        family = named_spec(value["family"])  # a class path saved before names: its name
        value["family"] = {k: v for k, v in family.items() if k not in LOCATION_KEYS}
    return value


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], source: str,
                   key: str = "resume") -> None:
    """Refuse to resume (``key="resume"``) or test (``key="ckpt_path"``) a run under another
    task, backbone or regime than it was trained with (weights would load, and the run would
    silently train or test something else)."""
    if not saved:
        return
    changed = [k for k in SAME_RUN_KEYS if k in saved and _differs(k, saved[k], current.get(k))]
    if not changed:
        return
    lines = [f"  {key}: the run has {was}, this command has {now}"
             for k in changed
             for key, was, now in _differences(_comparable(k, saved[k]),
                                               _comparable(k, current.get(k)), k)]
    fix = ("sharebone-train restores the run's own overrides (its .hydra/overrides.yaml); drop "
           "the ones that change these, and change only what may change on resume, e.g. "
           "trainer.max_epochs or test settings." if key == "resume" else
           "Compose the run's own task, backbone and regime (e.g. the experiment= or task= it "
           "was trained with), or score it on any task with sharebone-eval ckpt=... task=....")
    raise RunDirError(
        f"{key}={source} was trained with another {', '.join(changed)} than this command "
        "composes:\n" + "\n".join(lines) + "\n" + fix)


def _differences(saved: Any, current: Any, key: str) -> Iterator[tuple[str, str, str]]:
    """``(key, saved, current)`` for each leaf where two configs differ (at most 10)."""
    found = 0
    stack = [(key, saved, current)]
    while stack and found < 10:
        k, a, b = stack.pop(0)
        if isinstance(a, dict) and isinstance(b, dict):
            stack.extend((f"{k}.{sub}", a.get(sub, "(unset)"), b.get(sub, "(unset)"))
                         for sub in sorted(set(a) | set(b), key=str) if a.get(sub) != b.get(sub))
        elif a != b:
            found += 1
            yield k, _brief(a), _brief(b)


def _brief(value: Any) -> str:
    return value if value == "(unset)" else json.dumps(value, default=str)[:200]
