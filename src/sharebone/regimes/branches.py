"""Per-task branches of a shared backbone: hard parameter sharing at a depth of one's choosing.

Multitask learning shares the whole backbone and gives each task a head (Caruana 1997). Where
the branches should start is the question of how much to share (e.g. Misra et al.'s cross-stitch
study, CVPR 2016; Vandenhende et al.'s branched networks, BMVC 2020). ``sharing.branch_at=
<block>`` shares the trunk up to and including that block and gives every task its own copy of
every backbone parameter after it (``branch_at: head``, the default, shares everything, as
before); ``sharing.task=[<patterns>]`` names the per-task tensors directly. A task's copies
start equal to the backbone's own values and are used through
:func:`torch.func.functional_call`, so any backbone branches by parameter name, without being
rebuilt as a trunk and heads. The backbone's own values of a branched tensor stay as they
started (no gradient): they are what each copy started from.

A new task (few-shot evaluation) has no branch of its own: its features are every training
task's branch side by side (their concatenation), on which a head is fitted per support set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from sharebone.adaptation import dict_key
from sharebone.errors import SettingError

#: ``branch_at`` that shares the whole backbone (one branch per task begins at the head).
NO_BRANCH = "head"


def blocks_of(backbone: nn.Module) -> list[str]:
    """The module paths ``branch_at`` may name: the backbone's modules that hold parameters,
    to two levels below the backbone, with parameters after them (``blocks.0`` ...
    ``blocks.2`` for conv4: its last block and the container of all four leave nothing to
    branch)."""
    names = [name for name, _ in backbone.named_parameters()]
    return [name for name, module in backbone.named_modules()
            if name and name.count(".") <= 1 and any(True for _ in module.parameters())
            and not names[-1].startswith(name + ".")]


def after_block(backbone: nn.Module, block: str) -> list[str]:
    """Names (``backbone.<...>``) of the parameters after module ``block`` in the backbone's
    parameter order; refuses a block that does not exist, or one with nothing after it."""
    block = block.removeprefix("backbone.")
    names = [name for name, _ in backbone.named_parameters()]
    inside = [i for i, name in enumerate(names) if name.startswith(block + ".")]
    if not inside:
        raise SettingError(f"sharing.branch_at={block!r}: the backbone has no such block; "
                           f"branch after one of {', '.join(blocks_of(backbone))}, or "
                           f"branch_at={NO_BRANCH} to share the whole backbone.")
    after = names[inside[-1] + 1:]
    if not after:
        raise SettingError(f"sharing.branch_at={block!r}: nothing of the backbone comes after "
                           f"it, so nothing can branch; use branch_at={NO_BRANCH} for that.")
    return [f"backbone.{name}" for name in after]


class Branches(nn.Module):
    """Each task's copies of the branched backbone tensors (``copies.<task>.<name>``)."""

    def __init__(self, backbone: nn.Module, names: Sequence[str],
                 tasks: Sequence[str]) -> None:
        super().__init__()
        own = dict(backbone.named_parameters())
        self.names = [name.removeprefix("backbone.") for name in names]
        self.tasks = list(tasks)
        self.copies = nn.ModuleDict({
            dict_key(task): nn.ParameterDict({
                dict_key(name): nn.Parameter(own[name].detach().clone())
                for name in self.names})
            for task in self.tasks})

    def parameters_of(self, task: str) -> dict[str, torch.Tensor]:
        copies = self.copies[dict_key(task)]
        return {name: copies[dict_key(name)] for name in self.names}

    def features(self, backbone: nn.Module, task: str, x: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s features of ``x``: the shared trunk, then the task's branch."""
        return functional_call(backbone, self.parameters_of(task), (x,))

    def all_features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Every task's features side by side ``[B, tasks * D]``: a new task's input."""
        return torch.cat([self.features(backbone, task, x) for task in self.tasks], -1)
