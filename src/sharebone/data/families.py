"""Task families by name: the one way a task config becomes a family object.

A task config's ``family`` block names a registered family (``name: omniglot``), as backbones
and regimes are named, and gives it plain values (split specs, sizes, seeds);
:func:`build_family` builds it. A name does not move when a module does, so a saved run keeps
loading; the class paths configs used before (``_target_: sharebone.data.tasks.OmniglotTasks``)
are still accepted as aliases of their names (:data:`ALIASES`).

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

from sharebone.errors import SettingError, UnknownNameError
from sharebone.registry import Registry

FAMILIES: Registry[Any] = Registry("family")

#: Modules that define sharebone's own families (imported on first lookup, so that this module
#: stays at the bottom of the import graph).
BUILTIN_FAMILY_MODULES = ("sharebone.data.tasks", "sharebone.data.sinusoid",
                          "sharebone.data.multitask", "sharebone.data.image_folder",
                          "sharebone.data.sources")

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


#: Class paths that task configs and checkpoints used before families had names -> the name.
ALIASES = {
    "sharebone.data.tasks.OmniglotTasks": "omniglot",
    "sharebone.data.tasks.SyntheticImageTasks": "synthetic_images",
    "sharebone.data.sinusoid.SinusoidTasks": "sinusoid",
    "sharebone.data.multitask.OmniglotAlphabets": "omniglot_alphabets",
    "sharebone.data.multitask.SyntheticImageGroups": "synthetic_image_groups",
    "sharebone.data.multitask.SyntheticRegressionTasks": "synthetic_regression",
    "sharebone.data.image_folder.ImageFolderTasks": "image_folder",
}


def registered_families() -> dict[str, type]:
    """Name -> class, for every registered family."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
    return {name: FAMILIES.get(name) for name in FAMILIES.names()}


def family_name(spec: Mapping[str, Any]) -> str | None:
    """The registered name a ``family`` block asks for (its ``name``, or a ``_target_`` that is
    a registered family's class path, today's or an alias); None for any other class."""
    target = spec.get("_target_")
    known = {f"{cls.__module__}.{cls.__qualname__}": name
             for name, cls in registered_families().items()}
    by_target = known.get(target) or ALIASES.get(target)
    name = spec.get("name")
    if name is not None and target is not None and by_target != name:
        raise SettingError(f"task.family has name={name!r} and _target_={target!r}: give one. "
                           "For a family class of your own, drop the name "
                           "(~task.family.name task.family._target_=...).")
    return str(name) if name is not None else by_target


def named_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with a registered family's class path replaced by its name: the form saved
    configs are compared in (a checkpoint from before names matches today's config)."""
    name = family_name(spec)
    if name is None:
        return dict(spec)
    return {"name": name, **{k: v for k, v in spec.items() if k not in ("name", "_target_")}}


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
        spec: ``{"name": "<registered family>", **arguments}``, or ``{"_target_": "<family
            class>", **arguments}`` (an OmegaConf node or a dict).
        trusted: True for a config the user composed; False for one read from a file such as
            a checkpoint, which may then only name a registered family with plain arguments.

    Example:
        >>> family = build_family({"name": "synthetic_images", "classes": {"train": 8}},
        ...                       trusted=False)
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
    name = family_name(spec)
    arguments = {k: v for k, v in spec.items() if k not in ("name", "_target_")}
    known = registered_families()
    if not trusted:
        if name not in known:
            raise UnsafeConfigError(
                f"The saved task family {spec.get('name') or spec.get('_target_')!r} is not a "
                f"registered sharebone family (known: {', '.join(sorted(known))}); it is not "
                "built from a file. Pass task=<name from tasks/> to choose the task explicitly.")
        check_plain(arguments, "task.family")
    if name is not None:
        if name not in known:
            raise UnknownNameError(f"task.family.name: no family is registered as {name!r} "
                                   f"(known: {', '.join(sorted(known))}).")
        return known[name](**arguments)
    if spec.get("_target_") is None:
        raise SettingError("task.family needs a name (a registered family: "
                           f"{', '.join(sorted(known))}) or a _target_ (a family class of your "
                           "own).")
    from hydra.utils import instantiate

    return instantiate({"_target_": spec["_target_"], **arguments})
