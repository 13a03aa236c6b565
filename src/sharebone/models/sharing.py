"""What is shared and what is task-specific: the project's central accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


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
    """

    shared: int
    task_specific: int
    meta: int = 0
    description: str = ""

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def __str__(self) -> str:
        text = f"shared={self.shared:,}  task-specific={self.task_specific:,}"
        if self.meta:
            text += f"  meta={self.meta:,}"
        return text + (f"  ({self.description})" if self.description else "")
