"""What is shared and what is task-specific: the project's central accounting."""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from sharebone.errors import SettingError
from sharebone.models.adapters import ADAPTER_KINDS, check_options


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParameterSharing:
    """Parameter counts of a model under the regime that trains it.

    ``shared``: learned across tasks (a backbone, or MAML's whole initialisation).
    ``task_specific``: obtained per task (a head, or MAML's adapted copy); ``0`` when a task's
    part is computed in closed form (ProtoNet's prototypes).
    ``meta``: extra learned parameters of the regime itself (Meta-SGD's step sizes).
    ``description``: one line on how a task's part is obtained.
    ``roles``: parameters per role of a :class:`SharingMap` (:data:`ROLES`), for regimes that
    follow one; ``as_dict`` gives them as ``role_<role>``.
    ``adapters``: how many of the parameters ``sharing.adapters`` added (FiLM, adapters, LoRA).
    """

    shared: int
    task_specific: int
    meta: int = 0
    description: str = ""
    roles: Mapping[str, int] | None = None
    adapters: int = 0

    def as_dict(self) -> dict[str, int | str]:
        plain = asdict(self)
        roles = plain.pop("roles")
        plain.update({f"role_{k}": v for k, v in (roles or {}).items()})
        return plain

    def __str__(self) -> str:
        text = f"shared={self.shared:,}  task-specific={self.task_specific:,}"
        if self.meta:
            text += f"  meta={self.meta:,}"
        text += f"  ({self.description})" if self.description else ""
        if self.roles is not None:
            text += "  roles: " + " ".join(f"{k}={v:,}" for k, v in self.roles.items())
        if self.adapters:
            text += f"  (added by adapters: {self.adapters:,})"
        return text


# -- the sharing map ---------------------------------------------------------------------------

#: The roles a parameter can have, in the order counts are printed. ``shared``: trained by the
#: outer objective (the default); ``adapt``: updated per task from its support set; ``task``: a
#: fresh part per task; ``frozen``: trained by nobody.
ROLES = ("shared", "adapt", "task", "frozen")
#: The keys of a sharing map (``sharing.<key>`` in the configs), each a list of patterns.
MAP_KEYS = ("adapt", "task", "frozen")
#: The keys beside the roles: ``adapters`` (task-specific modules added to the backbone,
#: :mod:`sharebone.models.adapters`) and the test-time fine-tuning of the regimes without an
#: inner loop (``test_steps``, ``test_lr``: :mod:`sharebone.regimes.test_time`).
OPTION_KEYS = ("adapters", "test_steps", "test_lr", "branch_at")
#: Type selectors: a pattern that is one of these words selects by module type, not by name.
SELECTORS = {
    "norm": "the affine parameters of every BatchNorm/LayerNorm/GroupNorm/InstanceNorm",
    "bias": "every parameter named bias",
    "last_block": "the last block of the backbone (its last child module holding parameters "
                  "and submodules, below any single container such as conv4's blocks)",
}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's norms, or a module saying so (``is_norm = True``, as
    :class:`~sharebone.adaptation.TransductiveBatchNorm` does)."""
    return isinstance(module, _NORM_TYPES) or bool(getattr(module, "is_norm", False))


def norm_parameters(module: nn.Module, prefix: str) -> set[str]:
    """Names (``prefix`` + name) of the affine parameters of every norm layer in ``module``."""
    return {f"{prefix}{name}.{p}" if name else f"{prefix}{p}"
            for name, child in module.named_modules() if is_norm(child)
            for p, _ in child.named_parameters(recurse=False)}


def last_block(module: nn.Module, prefix: str) -> str | None:
    """The name (``prefix`` + path) of ``module``'s last block: below any chain of single
    containers, the last child that holds parameters and submodules (so a final norm or linear
    layer is not taken for a block). ``None`` when there is none."""
    path = ""
    while True:
        children = [(n, c) for n, c in module.named_children()
                    if any(True for _ in c.parameters())]
        if len(children) == 1 and any(True for _ in children[0][1].children()):
            name, module = children[0]
            path = f"{path}{name}."
            continue
        blocks = [(n, c) for n, c in children if any(True for _ in c.children())]
        if not blocks:
            return None
        return f"{prefix}{path}{blocks[-1][0]}"


def _is_selector(pattern: str) -> bool:
    return pattern.replace("_", "").isalnum()


@dataclass(frozen=True)
class SharingMap:
    """Which parameters of a model adapt per task, are a fresh part per task, are frozen; the
    rest is shared (trained by the outer objective).

    Each role is a list of patterns: fnmatch globs over parameter names (``backbone.*``,
    ``head.*``, ``backbone.blocks.3.*``) or a type selector (:data:`SELECTORS`: ``norm``,
    ``bias``, ``last_block``). ``adapt=None``: the regime's own choice (the MAML family's
    ``adapt`` option). Presets: ``configs/sharing/*.yaml`` and :data:`PRESETS`.

    Example:
        >>> names = ["backbone.0.weight", "backbone.0.bias", "head.weight", "head.bias"]
        >>> SharingMap(adapt=("head.*", "bias")).resolve(names)["backbone.0.bias"]
        'adapt'
        >>> SharingMap(adapt=("haed.*",)).resolve(names)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: sharing.adapt: 'haed.*' matches no parameter...
    """

    adapt: tuple[str, ...] | None = None
    task: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    #: ``None``, or ``{"kind": "film"|"residual"|"lora", ...its options}``.
    adapters: Mapping[str, Any] | None = None
    #: Test-time fine-tuning steps of the ``adapt`` set (regimes without an inner loop):
    #: ``None`` (the default count), a count ``>= 0``, or ``"auto"`` (chosen on validation).
    test_steps: int | str | None = None
    test_lr: float | None = None
    #: Multitask: the block after which every task has its own copy of the backbone
    #: (``"head"`` or ``None``: the whole backbone is shared).
    branch_at: str | None = None

    def __post_init__(self) -> None:
        if self.branch_at is not None and not isinstance(self.branch_at, str):
            raise SettingError(f"sharing.branch_at must name a block of the backbone (e.g. "
                               f"blocks.2) or head, got {self.branch_at!r}.")
        object.__setattr__(self, "adapters", adapter_spec(self.adapters))
        check_test_steps(self.test_steps)
        if self.test_lr is not None:
            check_positive("sharing.test_lr", self.test_lr, "Adam's learning rate for the "
                           "test-time fine-tuning steps", "sharing.test_lr=0.001")
        for key in MAP_KEYS:
            value = getattr(self, key)
            if value is None and key == "adapt":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value or ()):
                raise SettingError(f"sharing.{key} must be a list of patterns, e.g. "
                                   f"sharing.{key}=[head.*], got {value!r}.")
            object.__setattr__(self, key, tuple(value or ()))
            for pattern in getattr(self, key):
                if _is_selector(pattern) and pattern not in SELECTORS:
                    near = close_names(pattern, SELECTORS)
                    hint = f" Did you mean {near[0]!r}?" if near else ""
                    raise SettingError(
                        f"sharing.{key}: unknown selector {pattern!r}.{hint} Selectors: "
                        f"{', '.join(SELECTORS)}; or a glob over parameter names such as "
                        "'backbone.*' or 'head.*'.")

    @classmethod
    def of(cls, spec: SharingMap | Mapping[str, Any] | None) -> SharingMap | None:
        """A map from its plain form (a config's ``sharing``, a checkpoint's hparam); ``None``
        (or every key unset): no map, the regime's own behaviour."""
        if spec is None or isinstance(spec, SharingMap):
            return spec
        unknown = sorted(set(spec) - set(MAP_KEYS) - set(OPTION_KEYS))
        if unknown:
            near = close_names(unknown[0], (*MAP_KEYS, *OPTION_KEYS))
            hint = f" Did you mean sharing.{near[0]}?" if near else ""
            raise SettingError(f"sharing.{unknown[0]}: no such key.{hint} A sharing map has "
                               f"the keys {', '.join(MAP_KEYS)} (lists of patterns) and "
                               f"{', '.join(OPTION_KEYS)}.")
        if all(spec.get(key) is None for key in (*MAP_KEYS, "adapters", "branch_at")):
            given = next((k for k in OPTION_KEYS if spec.get(k) is not None), None)
            if given is not None:
                raise SettingError(f"sharing.{given}={spec[given]!r}, but nothing adapts: it "
                                   "sets how the sharing.adapt parameters are fine-tuned at "
                                   "test time. Choose them too, e.g. sharing=norm or "
                                   "sharing.adapt=[last_block].")
            return None
        return cls(adapt=spec.get("adapt"), task=spec.get("task") or (),
                   frozen=spec.get("frozen") or (),  # lists: made tuples, checked, below
                   adapters=spec.get("adapters"), test_steps=spec.get("test_steps"),
                   test_lr=spec.get("test_lr"), branch_at=spec.get("branch_at"))

    def as_dict(self) -> dict[str, list[str] | None]:
        """Plain data (lists), as configs and checkpoints hold it."""
        plain: dict[str, Any] = {"adapt": None if self.adapt is None else list(self.adapt),
                                 "task": list(self.task), "frozen": list(self.frozen)}
        for key in OPTION_KEYS:  # only when set: older checkpoints hold the three roles
            value = getattr(self, key)
            if value is not None:
                plain[key] = dict(value) if key == "adapters" else value
        return plain

    def with_adapt(self, adapt: Sequence[str]) -> SharingMap:
        """This map with ``adapt`` filled in (where it is ``None``: the regime's own)."""
        return self if self.adapt is not None else replace(self, adapt=tuple(adapt))

    def matches(self, pattern: str, names: Sequence[str], norm: Collection[str] = (),
                blocks: Mapping[str, str | None] | None = None) -> list[str]:
        """The names ``pattern`` selects. ``norm``: names of norm affine parameters;
        ``blocks``: ``{"last_block": prefix}`` for the ``last_block`` selector."""
        if pattern == "norm":
            return [n for n in names if n in norm]
        if pattern == "bias":
            return [n for n in names if n.rsplit(".", 1)[-1] == "bias"]
        if pattern == "last_block":
            block = (blocks or {}).get("last_block")
            return [] if block is None else [n for n in names if n.startswith(block + ".")]
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def resolve(self, names: Sequence[str], norm: Collection[str] = (),
                blocks: Mapping[str, str | None] | None = None,
                adapt_source: str = "sharing.adapt") -> dict[str, str]:
        """The role of every name in ``names`` (in their order). Refuses, naming the key: a
        pattern that selects nothing (with the closest names), a name given two roles.
        ``adapt_source``: what the ``adapt`` patterns came from, for messages."""
        roles: dict[str, tuple[str, str]] = {}
        for key in MAP_KEYS:
            source = adapt_source if key == "adapt" else f"sharing.{key}"
            for pattern in getattr(self, key) or ():
                found = self.matches(pattern, names, norm, blocks)
                if not found:
                    raise SettingError(f"{source}: {pattern!r} matches no parameter"
                                       f"{_near(pattern, names)}")
                for name in found:
                    previous = roles.get(name)
                    if previous is not None and previous[0] != key:
                        raise SettingError(
                            f"{source}: {pattern!r} gives {name} the role {key!r}, but "
                            f"{previous[1]} already made it {previous[0]!r} (pattern "
                            f"{previous[2]!r}); a parameter has one role. Narrow one of "
                            "the two lists.")
                    roles[name] = (key, source, pattern)
        return {n: roles[n][0] if n in roles else "shared" for n in names}


def adapter_spec(spec: Any) -> dict[str, Any] | None:
    """``sharing.adapters`` in its one form: ``None``, or ``{"kind": ..., options}`` (a bare
    kind, ``film``, stands for ``{"kind": "film"}``); the kind and options are checked."""
    if spec is None or spec == "none":
        return None
    plain = {"kind": spec} if isinstance(spec, str) else dict(spec) if isinstance(
        spec, Mapping) else None
    kind = None if plain is None else plain.get("kind")
    if kind not in ADAPTER_KINDS:
        raise SettingError(f"sharing.adapters: got {spec!r}; give an adapter kind "
                           f"({', '.join(ADAPTER_KINDS)}) or null, e.g. sharing.adapters=film "
                           "or sharing.adapters={kind: lora, rank: 4}.")
    options = {k: v for k, v in plain.items() if k != "kind" and v is not None}
    check_options(kind, options)
    return {"kind": kind, **options}


def check_test_steps(value: Any) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingError(f"sharing.test_steps must be a count >= 0 or auto (chosen on "
                           f"validation episodes after training), got {value!r}.")


def check_positive(key: str, value: Any, what: str, fix: str) -> float:
    """``value`` as a float, refused unless a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 < value < float("inf")):
        raise SettingError(f"{key} ({what}) must be a number > 0, got {value!r}. Fix: {fix}.")
    return float(value)


def close_names(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to ``word`` (difflib), best first."""
    return difflib.get_close_matches(word, sorted(set(candidates)), n=n, cutoff=0.5)


def _near(pattern: str, names: Sequence[str]) -> str:
    """``"; did you mean ...?"`` for a pattern that selected nothing: the closest parameter
    names and module paths (as ``path.*``)."""
    prefixes = {n.rsplit(".", i)[0] + ".*" for n in names for i in range(1, n.count(".") + 1)}
    near = close_names(pattern, [*names, *prefixes, *SELECTORS])
    shown = ", ".join(near) if near else ", ".join(names[:4]) + (", ..." if len(names) > 4
                                                               else "")
    return (f". Did you mean {shown}? (Patterns are fnmatch globs over parameter names such "
            f"as {names[0] if names else 'backbone.*'!r}, or the selectors "
            f"{', '.join(SELECTORS)}.)" if near else
            f"; the parameters are {shown} (fnmatch globs, or the selectors "
            f"{', '.join(SELECTORS)}).")


#: The presets of ``configs/sharing/`` that the MAML family's ``adapt`` option stands for.
PRESETS: dict[str, SharingMap] = {
    "all": SharingMap(adapt=("*",)),        # MAML (Finn et al. 2017)
    "head": SharingMap(adapt=("head.*",)),  # ANIL (Raghu et al. 2020)
}


def role_counts(roles: Mapping[str, str], sizes: Mapping[str, int]) -> dict[str, int]:
    """Parameters (elements) per role, every role present (0 when none)."""
    counts = dict.fromkeys(ROLES, 0)
    for name, role in roles.items():
        counts[role] += sizes[name]
    return counts


def block_counts(roles: Mapping[str, str], sizes: Mapping[str, int],
                 depth: int = 2) -> dict[str, dict[str, int]]:
    """Parameters per role for each top-level block (the first ``depth`` parts of a name,
    e.g. ``backbone.blocks`` ... ``head.weight`` -> ``head``), in order."""
    blocks: dict[str, dict[str, int]] = {}
    for name, role in roles.items():
        block = ".".join(name.split(".")[:depth]) if name.startswith("backbone.") else (
            name.split(".")[0])
        counts = blocks.setdefault(block, {})
        counts[role] = counts.get(role, 0) + sizes[name]
    return blocks


def with_roles(sharing: ParameterSharing, model: nn.Module) -> ParameterSharing:
    """``sharing`` with :attr:`ParameterSharing.roles` and ``adapters`` filled in: from the
    model's resolved map (``sharing_roles``), else, for a regime that follows none,
    ``shared`` its shared count (less what is frozen), ``task`` its task-specific count,
    ``frozen`` the parameters of ``model`` that require no gradient, ``adapt`` 0."""
    added = dict(model.named_parameters())
    adapters = sum(added[n].numel() for n in getattr(model, "adapter_names", ()) if n in added)
    sharing = replace(sharing, adapters=adapters)
    roles = getattr(model, "sharing_roles", None)
    if sharing.roles is None and roles is not None:
        sizes = {n: math.prod(s) for n, s in model.mapped_shapes().items()}
        return replace(sharing, roles=role_counts(roles, sizes))
    if sharing.roles is not None:
        return sharing
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return replace(sharing, roles={"shared": max(sharing.shared - frozen, 0), "adapt": 0,
                                   "task": sharing.task_specific, "frozen": frozen})
