"""Test-time fine-tuning: the ``adapt`` set of a sharing map, for regimes without an inner loop.

ProtoNet, pre-training and multitask learn a backbone that no task changes while it trains.
A sharing map's ``adapt`` role gives them a task-specific part all the same: before a task's
prototypes or head are computed, the chosen parameters (a block, the norms, the biases, FiLM
or adapter parameters) take ``test_steps`` Adam steps on that task's support set, from the
trained values, with the support set as its own queries under the prototypical loss (the
fine-tuning stage of P>M>F, Hu, Li, Stühmer, Kim & Hospedales, CVPR 2022, arXiv:2204.07305).
Each task starts again from the trained values, and nothing of the model changes: the
fine-tuned values live in a dictionary handed to :func:`torch.func.functional_call`, and the
backbone runs in eval mode (its batch-norm statistics stay as trained).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.models.heads import prototypes, squared_euclidean
from sharebone.models.sharing import SharingMap, last_block, norm_parameters
from sharebone.regimes.branches import NO_BRANCH, after_block

if TYPE_CHECKING:
    from torch import nn

#: Steps and learning rate when the map sets none (``sharing.test_steps`` / ``test_lr``).
DEFAULT_STEPS = 10
DEFAULT_LR = 1e-3
#: What ``auto`` chooses from, on validation episodes after training.
CANDIDATES: dict[str, tuple[Any, ...]] = {"test_steps": (0, 5, 10, 25, 50),
                                          "test_lr": (1e-4, 1e-3, 1e-2)}


@dataclass(frozen=True)
class FineTuning:
    """What is fine-tuned on a support set: backbone parameter ``names`` (without the
    ``backbone.`` prefix), for ``steps`` Adam steps at ``lr``."""

    names: tuple[str, ...]
    steps: int
    lr: float

    @classmethod
    def of(cls, sharing: Mapping[str, Any] | None,
           roles: Mapping[str, str]) -> FineTuning | None:
        """From a model's ``hparams["sharing"]`` and its resolved roles; ``None`` when nothing
        adapts. ``auto`` not yet chosen counts as the default."""
        names = tuple(n.removeprefix("backbone.") for n, r in roles.items() if r == "adapt")
        if not names:
            return None
        sharing = sharing or {}
        steps, lr = sharing.get("test_steps"), sharing.get("test_lr")
        return cls(names, DEFAULT_STEPS if steps in (None, "auto") else int(steps),
                   DEFAULT_LR if lr in (None, "auto") else float(lr))


def prototype_loss(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Cross-entropy of ``features [S, D]`` against their own class prototypes."""
    centers = prototypes(features.unsqueeze(0), labels.unsqueeze(0), n_way)
    logits = -squared_euclidean(features.unsqueeze(0), centers)[0]
    return F.cross_entropy(logits, labels)


def finetuned_features(model: Any, episode: Episode,
                       fine_tuning: FineTuning) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query features ``[T, S, D]``, ``[T, Q, D]`` of a meta-batch, each task's
    computed after ``fine_tuning`` on its own support set (``model.support_loss``)."""
    backbone: nn.Module = model.backbone
    trained = dict(backbone.named_parameters())
    supports, queries = [], []
    for t in range(episode.support.shape[0]):
        support, query = episode.support[t], episode.query[t]
        labels = episode.support_labels[t]
        fast = {n: trained[n].detach().clone().requires_grad_(True) for n in fine_tuning.names}
        optimizer = torch.optim.Adam(list(fast.values()), lr=fine_tuning.lr)
        with torch.enable_grad():
            for _ in range(fine_tuning.steps):
                loss = model.support_loss(functional_call(backbone, fast, (support,)), labels,
                                          episode.n_way)
                grads = torch.autograd.grad(loss, list(fast.values()))
                for value, grad in zip(fast.values(), grads, strict=True):
                    value.grad = grad
                optimizer.step()
        with torch.no_grad():
            features = functional_call(backbone, fast, (torch.cat([support, query]),))
        supports.append(features[:len(support)])
        queries.append(features[len(support):])
    return torch.stack(supports), torch.stack(queries)


def resolve_roles(sharing_map: SharingMap, model: nn.Module, regime: str,
                  task_copies: bool = False) -> dict[str, str]:
    """Every parameter's role under ``sharing_map``, for a regime without an inner loop.

    ``adapt`` patterns select among the backbone's parameters: a task's head is fitted on its
    support set by these regimes, and the heads they train are not used on a new task, so
    ``head.*`` patterns (the presets' head) are skipped. ``frozen`` selects among every
    parameter. Refused, naming the key: a ``task`` role (these regimes make a task's part
    themselves), a parameter given two roles, a pattern that selects nothing.

    ``task_copies`` (multitask): ``task`` patterns and ``branch_at`` select backbone
    parameters of which every training task gets its own copy
    (:mod:`sharebone.regimes.branches`)."""
    names = [name for name, _ in model.named_parameters()]
    backbone_names = [n for n in names if n.startswith("backbone.")]
    norm = norm_parameters(model.backbone, "backbone.")
    blocks = {"last_block": last_block(model.backbone, "backbone.")}
    branched = sharing_map.branch_at not in (None, NO_BRANCH)
    if (sharing_map.task or branched) and not task_copies:
        key = "task" if sharing_map.task else "branch_at"
        raise SettingError(
            f"sharing.{key}: {regime} makes a task's part itself (prototypes, or a head fitted "
            "on each support set), so no parameter can be a fresh part per task (per-task "
            "copies are multitask's: regime=multitask). Leave it unset, and use "
            "sharing.adapt to fine-tune parameters per task.")
    adapt = tuple(p for p in sharing_map.adapt or () if not p.startswith("head."))
    roles = SharingMap(adapt=adapt).resolve(backbone_names, norm, blocks)
    if task_copies:
        tasks = SharingMap(task=sharing_map.task).resolve(backbone_names, norm, blocks)
        for name in after_block(model.backbone, sharing_map.branch_at) if branched else ():
            tasks[name] = "task"
        for name, role in tasks.items():
            if role == "task":
                if roles.get(name) == "adapt":
                    raise SettingError(f"sharing.task: {name} is also selected by "
                                       "sharing.adapt; a parameter has one role.")
                roles[name] = "task"
    frozen = SharingMap(frozen=sharing_map.frozen).resolve(names, norm, blocks)
    for name, role in frozen.items():
        if role == "frozen" and roles.get(name) in ("adapt", "task"):
            raise SettingError(f"sharing.frozen: {name} is also selected by sharing."
                               f"{roles[name]}; a parameter has one role. Narrow one of the "
                               "two lists.")
    return {n: roles[n] if roles.get(n) in ("adapt", "task") else frozen[n] for n in names}
