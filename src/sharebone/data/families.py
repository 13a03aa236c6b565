"""Task families by name: the one way a task config becomes a family object.

A task config's ``family`` block names a family class (``_target_``, as Hydra writes it) and
gives it plain values (split specs, sizes, seeds). :func:`build_family` builds it.

Where the block comes from matters. A config the user composed (``tasks/*.yaml`` plus
overrides) is trusted like any code the user runs: its ``_target_`` may name a family class of
the user's own. A block read back from a checkpoint is *data*: it is rebuilt only as one of the
registered families, from plain values, and anything else is refused. Otherwise a crafted
checkpoint that loads safely (``weights_only=True``) could still name ``builtins.open`` as its
"family" and have it called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from sharebone.errors import SettingError
from sharebone.registry import Registry

FAMILIES: Registry[Any] = Registry("family")

#: Modules that define sharebone's own families (imported on first lookup, so that this module
#: stays at the bottom of the import graph).
BUILTIN_FAMILY_MODULES = ("sharebone.data.tasks", "sharebone.data.sinusoid",
                          "sharebone.data.multitask", "sharebone.data.image_folder")

#: Values a family may be built from when its config is untrusted.
PLAIN_TYPES = (str, int, float, bool, type(None))


class UnsafeConfigError(SettingError):
    """A config read from a file (a checkpoint) asks for something other than plain data."""


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: a task family buildable by name and from checkpoints' configs."""

    def decorator(cls: type) -> type:
        FAMILIES.register(name)(cls)
        cls.family_name = name
        return cls

    return decorator


def target_of(cls: type) -> str:
    """The dotted path a task config's ``_target_`` uses for ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_families() -> dict[str, type]:
    """``_target_`` path -> class, for every registered family."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
    return {target_of(FAMILIES.get(name)): FAMILIES.get(name) for name in FAMILIES.names()}


def check_plain(value: Any, where: str) -> None:
    """Refuse anything but nested dicts/lists of str, int, float, bool and None, and any
    key that Hydra would act on (``_target_``, ``_partial_``, ``_args_``, ...)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or (key.startswith("_") and key.endswith("_")):
                raise UnsafeConfigError(f"{where} has the key {key!r}; a saved task config holds "
                                        "plain values only.")
            check_plain(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise UnsafeConfigError(f"{where} is a {type(value).__name__}; a saved task config holds "
                                "plain values only.")


def build_family(spec: Mapping[str, Any], *, trusted: bool = True) -> Any:
    """The task family a config's ``family`` block describes.

    Args:
        spec: ``{"_target_": "<family class>", **arguments}`` (an OmegaConf node or a dict).
        trusted: True for a config the user composed; False for one read from a file such as
            a checkpoint, which may then only name a registered family with plain arguments.

    Example:
        >>> family = build_family({"_target_": "sharebone.data.tasks.SyntheticImageTasks",
        ...                        "classes": {"train": 8}}, trusted=False)
        >>> family.family_name, family.input_shape
        ('synthetic_images', (1, 28, 28))
        >>> build_family({"_target_": "builtins.print"}, trusted=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sharebone.data.families.UnsafeConfigError: The saved task family 'builtins.print' is ...
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    arguments = dict(spec)
    target = arguments.pop("_target_", None)
    known = registered_families()
    if not trusted:
        if target not in known:
            raise UnsafeConfigError(
                f"The saved task family {target!r} is not a registered sharebone family "
                f"(known: {', '.join(sorted(known))}); it is not built from a file. Pass "
                "task=<name from tasks/> to choose the task explicitly.")
        check_plain(arguments, "task.family")
    if target in known:
        return known[target](**arguments)
    if target is None:
        raise SettingError("A task config's family block needs a _target_ (the family class), e.g. "
                           "_target_: sharebone.data.tasks.OmniglotTasks.")
    from hydra.utils import instantiate

    return instantiate({"_target_": target, **arguments})
