""""Did you mean ...?" for command-line overrides that name nothing.

Hydra refuses ``regime.lrr=1e-3`` ("Could not override 'regime.lrr'") and
``task=omniglot_smal`` ("Could not find 'task/omniglot_smal'") and exits. After it has, the
console scripts call :func:`print_hints`: it composes the config again with the overrides
that were valid and names the closest existing keys and group options (difflib), under
Hydra's own message. It runs only when the app failed, so it costs a good run nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from sharebone.config import CONFIG_DIR


def close(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to ``word`` (difflib's ratio >= 0.6), best first."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.6)


def _parse(args: list[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # --cfg job, -m, ...
            continue
        try:
            parsed.extend(parser.parse_overrides([arg]))
        except Exception:  # noqa: BLE001 - Hydra has said what is wrong with its syntax
            continue
    return parsed


def _groups(loader: Any, parent: str = "") -> set[str]:
    found = set()
    for name in loader.list_groups(parent):
        group = f"{parent}/{name}" if parent else name
        found.add(group)
        found |= _groups(loader, group)
    return found


def _values(override: Override) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return list(value) if isinstance(value, list) else [value]


def _key_hint(key: str, cfg: Mapping[str, Any], groups: set[str]) -> list[str]:
    """Nearest existing keys for a dotted ``key`` that the composed ``cfg`` lacks."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            return []  # below a value: not a misspelling we can place
        if part in node:
            node = node[part]
            continue
        names = [str(k) for k in node]
        if i == 0:  # a group left out of the config (experiment: null) is a name too
            names += [g for g in groups if "/" not in g]
        prefix, rest = parts[:i], parts[i + 1:]
        return [".".join([*prefix, match, *rest]) for match in close(part, names)]
    return []


def hints(args: list[str], config_name: str, config_dir: str | None = None) -> list[str]:
    """One line per override in ``args`` that names no key or group option, with the nearest
    valid ones (none where nothing is close)."""
    overrides = [o for o in _parse(args) if not (o.is_delete() or o.is_add()
                                                 or o.is_force_add())]
    if not overrides:
        return []
    GlobalHydra.instance().clear()
    lines = []
    with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = _groups(loader)
        valid, keys = [], []
        for o in overrides:
            name = o.key_or_group
            if name in groups:
                options = loader.get_group_options(name, results_filter=ObjectType.CONFIG)
                wrong = [v for v in _values(o) if isinstance(v, str) and v not in options]
                for value in wrong:
                    near = close(value, options)
                    if near:
                        lines.append(f"Did you mean {' or '.join(f'{name}={n}' for n in near)}? "
                                     f"('{value}' is not an option of {name}/)")
                if not wrong and not o.is_sweep_override():
                    valid.append(o.input_line)
            elif not name.startswith("hydra.") and "/" not in name:
                keys.append(name)
        if keys:
            cfg = _compose(config_name, valid)
            for key in keys:
                near = _key_hint(key, cfg, groups)
                if near:
                    lines.append(f"Did you mean {' or '.join(near)}? ('{key}' is not a key of "
                                 f"the {config_name} config)")
    GlobalHydra.instance().clear()
    return lines


def _compose(config_name: str, overrides: list[str]) -> dict[str, Any]:
    """The config with the valid group choices (without them if those fail to compose)."""
    for attempt in (overrides, []):
        try:
            cfg = compose(config_name=config_name, overrides=attempt)
            return OmegaConf.to_container(cfg, resolve=False)
        except Exception:  # noqa: BLE001 - a hint is a bonus; Hydra has reported the error
            continue
    return {}


def print_hints(args: list[str], config_name: str, file: TextIO | None = None) -> list[str]:
    """:func:`hints` for a failed app, printed (to stderr); never raises."""
    try:
        lines = hints(args, config_name)
    except Exception:  # noqa: BLE001 - never hide the app's own error behind ours
        return []
    for line in lines:
        print(line, file=file or sys.stderr)
    return lines


@contextlib.contextmanager
def on_failure(args: list[str], config_name: str) -> Iterator[None]:
    """Around a Hydra app: when it fails (Hydra reports and exits non-zero; with
    ``HYDRA_FULL_ERROR=1`` it raises), :func:`print_hints` under its message."""
    try:
        yield
    except SystemExit as exit:
        if exit.code not in (0, None):
            print_hints(args, config_name)
        raise
    except Exception:
        print_hints(args, config_name)
        raise
