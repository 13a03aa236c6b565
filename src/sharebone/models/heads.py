"""Task-specific heads on a shared backbone, and how a task's head starts.

A head maps ``backbone.num_features`` features to one output per way (or one regression
output). Gradient-based regimes (MAML, ANIL, Meta-SGD) adapt it on each task's support set; what
it starts from is :func:`initial_head`'s business, and it answers for any ``n_way``, so a model
trained 5-way can be evaluated 20-way:

- ``"learned"`` (Finn et al. 2017): the head's initialisation is meta-learned. At the trained
  ``n_way`` it is used as is. At any other ``n_way`` every way starts from the mean of the
  learned rows (and biases): labels are shuffled per episode, so the ways are exchangeable and
  their mean is the one initialisation that favours none of them (UnicornMAML's single shared
  row, Ye & Chao, ICLR 2022, arXiv:2106.16245).
- ``"zero"`` (the "zeroing trick", Kao et al., ICLR 2022, arXiv:2106.15367): every task's head
  starts at zero; nothing about the head is meta-learned, any ``n_way`` works alike.
- ``"proto"`` (Proto-MAML, Triantafillou et al., ICLR 2020, arXiv:1903.03096): the head starts as
  the prototype classifier of the support set, ``W_k = 2 c_k``, ``b_k = -||c_k||^2``; gradients
  flow through the prototypes into the backbone.

A backbone trained without episodes (multitask, pre-training) is scored as Baseline/RFS score
theirs: a fresh head fitted on each episode's support features in closed form or by a few
steps (:func:`fit_linear_classifier`, :func:`ridge_predict` for regression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sharebone.errors import SettingError

HEAD_INITS = ("learned", "zero", "proto")


class LinearHead(nn.Module):
    """A linear layer from backbone features to ``out_features`` outputs (ways, or 1 target).

    Args:
        in_features: the backbone's ``num_features``.
        out_features: outputs at training time (the trained ``n_way``; 1 for regression).
        init: ``"learned"`` keeps learnable weights (PyTorch's default uniform init);
            ``"zero"`` and ``"proto"`` keep none, a task's head comes from :func:`initial_head`.

    Example:
        >>> head = LinearHead(64, 5)
        >>> head(torch.zeros(3, 64)).shape
        torch.Size([3, 5])
        >>> sum(p.numel() for p in LinearHead(64, 5, init="zero").parameters())
        0
    """

    def __init__(self, in_features: int, out_features: int, init: str = "learned") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise SettingError(f"head init must be one of {HEAD_INITS}, got {init!r}.")
        self.in_features, self.out_features, self.init = in_features, out_features, init
        if init == "learned":
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            self.bias = nn.Parameter(torch.empty(out_features))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.weight = self.bias = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"A head with init={self.init!r} has no weights of its own; take "
                               "a task's head from sharebone.models.heads.initial_head.")
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, init={self.init}"


CLASSIFIERS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """Baseline++'s classifier (Chen, Liu, Kira, Wang & Huang, ICLR 2019, arXiv:1904.04232):
    logits are ``scale * cos(f, w_k)``, the cosine similarity of a feature to each class's
    weight vector, times a learned ``scale``. Normalising both sides removes the features'
    norm from the decision, which the paper credits for less intra-class variation.

    Args:
        in_features: the backbone's ``num_features``.
        out_features: classes.
        scale: the initial scale (learned; > 0).

    Example:
        >>> head = CosineClassifier(4, 3, scale=10.0)
        >>> bool(head(torch.randn(2, 4)).abs().max() <= 10.0)
        True
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__()
        check_scale(scale)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


def check_scale(scale: float) -> None:
    """A cosine classifier's scale must be > 0 (the logits would be flat or inverted)."""
    if isinstance(scale, bool) or not scale > 0:
        raise SettingError(f"regime.scale must be > 0 (the cosine classifier's initial logit "
                           f"scale), got {scale!r}. Fix: regime.scale=10.0.")


def prototype_head(features: torch.Tensor, labels: torch.Tensor,
                   n_way: int) -> dict[str, torch.Tensor]:
    """Proto-MAML's head for one task: support features ``[S, D]``, labels ``[S]`` ->
    ``weight [n_way, D] = 2 c_k``, ``bias [n_way] = -||c_k||^2`` (``c_k``: class means), so
    that the logits equal negative squared distances up to a per-query constant."""
    # A comparison, not F.one_hot: it also runs under torch.vmap.
    one_hot = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(features.dtype)
    centers = (one_hot.T @ features) / one_hot.sum(0).unsqueeze(-1)
    return {"weight": 2 * centers, "bias": -(centers * centers).sum(-1)}


def resize_ways(tensor: torch.Tensor, n_way: int) -> torch.Tensor:
    """A per-way tensor ``[n_trained, ...]`` for ``n_way`` ways: itself when the counts match,
    else its mean over ways repeated ``n_way`` times (ways are exchangeable)."""
    if tensor.shape[0] == n_way:
        return tensor
    return tensor.mean(0, keepdim=True).expand(n_way, *tensor.shape[1:])


def initial_head(head: LinearHead, n_way: int, support_features: torch.Tensor | None = None,
                 support_labels: torch.Tensor | None = None,
                 like: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The head a task starts from, ``{"weight": [n_way, D], "bias": [n_way]}``, for any
    ``n_way`` (see the module docstring for the three rules). A zero head takes its dtype and
    device from ``support_features``, else from ``like``.

    Example:
        >>> head = LinearHead(4, 5)
        >>> initial_head(head, 5)["weight"] is head.weight     # trained n_way: the learned head
        True
        >>> w = initial_head(head, 20)["weight"]               # other n_way: the mean row
        >>> w.shape, torch.allclose(w[7], head.weight.mean(0))
        (torch.Size([20, 4]), True)
    """
    if head.init == "learned":
        return {"weight": resize_ways(head.weight, n_way), "bias": resize_ways(head.bias, n_way)}
    if head.init == "zero":
        ref = support_features if support_features is not None else like
        kwargs = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        return {"weight": torch.zeros(n_way, head.in_features, **kwargs),
                "bias": torch.zeros(n_way, **kwargs)}
    if support_features is None or support_labels is None:
        raise SettingError("A 'proto' head is built from the support set: pass support_features "
                           "and support_labels.")
    return prototype_head(support_features, support_labels, n_way)


# ------------------------------------------------------------------ a fresh head per episode

HEAD_FITS = ("logistic", "sgd")
DEFAULT_HEAD_FIT: dict[str, Any] = {"method": "logistic", "steps": 100, "lr": 0.5, "l2": 0.01,
                                    "normalize": True}


@dataclass(frozen=True)
class LinearClassifier:
    """Per-task linear heads ``weight [T, n_way, D]``, ``bias [T, n_way]``."""

    weight: torch.Tensor
    bias: torch.Tensor
    normalize: bool = True
    #: Baseline++'s cosine classifier: ``scale * cos(f, w_k)``, no bias.
    cosine_scale: torch.Tensor | float | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.cosine_scale is not None:
            return cosine_logits(features, self.weight, self.cosine_scale)
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return features @ self.weight.transpose(1, 2) + self.bias.unsqueeze(1)


def cosine_logits(features: torch.Tensor, weight: torch.Tensor,
                  scale: torch.Tensor | float) -> torch.Tensor:
    """``scale * cos(f, w_k)`` per task: ``features [T, M, D]``, ``weight [T, n_way, D]``."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).transpose(1, 2)


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, n_way: int,
                          method: str = "logistic", steps: int = 100, lr: float = 0.5,
                          l2: float = 0.01, normalize: bool = True,
                          cosine_scale: torch.Tensor | float | None = None) -> LinearClassifier:
    """Fit one multinomial logistic-regression head per task on support features.

    ``features [T, S, D]``, ``labels [T, S]``; minimises mean cross-entropy plus
    ``l2 / 2 * ||W||^2`` from zero, on L2-normalised features when ``normalize`` (Tian et al.
    2020's RFS recipe). ``method="logistic"`` runs L-BFGS for up to ``steps`` iterations (the
    convex problem, solved); ``"sgd"`` takes ``steps`` plain gradient steps of size ``lr`` (a
    fine-tuned head's few steps). Gradients are enabled inside, so it works under ``no_grad``.
    ``cosine_scale``: fit Baseline++'s cosine classifier instead (``scale * cos(f, w_k)``, no
    bias; Chen et al. 2019), its rows starting from the class means (a zero row has no
    direction).

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])           # one task, two ways
        >>> head = fit_linear_classifier(x, torch.tensor([[0, 1]]), n_way=2)
        >>> head(torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])).argmax(-1)
        tensor([[0, 1]])
    """
    if method not in HEAD_FITS:
        raise SettingError(f"head_fit.method must be one of {HEAD_FITS}, got {method!r}.")
    features = features.detach()
    if normalize:
        features = F.normalize(features, dim=-1)
    tasks, _, dim = features.shape
    if cosine_scale is None:
        weight = torch.zeros(tasks, n_way, dim, device=features.device, dtype=features.dtype,
                             requires_grad=True)
    else:
        cosine_scale = (cosine_scale.detach().to(features.dtype)
                        if isinstance(cosine_scale, torch.Tensor) else float(cosine_scale))
        one_hot = F.one_hot(labels, n_way).to(features.dtype)
        weight = (one_hot.transpose(1, 2) @ features).requires_grad_()
    bias = torch.zeros(tasks, n_way, device=features.device, dtype=features.dtype,
                       requires_grad=True)

    def objective() -> torch.Tensor:
        logits = (features @ weight.transpose(1, 2) + bias.unsqueeze(1)
                  if cosine_scale is None else cosine_logits(features, weight, cosine_scale))
        # Sum of per-task mean losses: separable, so one solve fits every task's own head.
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        # A cosine classifier's logits ignore the rows' norms: no penalty on them.
        penalty = 0.5 * l2 * weight.pow(2).sum() if cosine_scale is None else 0.0
        return ce.view(tasks, -1).mean(1).sum() + penalty

    with torch.enable_grad():
        if method == "logistic":
            optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps,
                                          line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            optimizer = torch.optim.SGD([weight, bias], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad()
                objective().backward()
                optimizer.step()
    return LinearClassifier(weight.detach(), bias.detach(), normalize, cosine_scale)


def ridge_predict(support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                  l2: float = 0.01) -> torch.Tensor:
    """Ridge regression per task, closed form: ``support [T, S, D]``, ``targets [T, S, O]``
    (regression episodes' labels, ``O = 1``), ``query [T, Q, D]`` -> predictions ``[T, Q, O]``
    (with a bias; dual form, ``S`` small).

    Example:
        >>> x = torch.arange(6.0).view(1, 6, 1)
        >>> ridge_predict(x, 2 * x + 1, torch.tensor([[[10.0]]]), l2=1e-6).round()
        tensor([[[21.]]])
    """
    ones = torch.ones(*support.shape[:-1], 1, dtype=support.dtype, device=support.device)
    xs = torch.cat([support.detach(), ones], -1)
    xq = torch.cat([query.detach(), torch.ones(*query.shape[:-1], 1, dtype=query.dtype,
                                               device=query.device)], -1)
    gram = xs @ xs.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    alpha = torch.linalg.solve(gram + l2 * eye, targets.to(gram.dtype))
    return xq @ xs.transpose(1, 2) @ alpha


# -------------------------------------- prototypes (ProtoNet; test-time fine-tuning as well)

def prototypes(support_features: torch.Tensor, support_labels: torch.Tensor, n_way: int):
    """Class means of support embeddings: ``[T, S, D]``, labels ``[T, S]`` -> ``[T, n_way, D]``."""
    one_hot = torch.nn.functional.one_hot(support_labels, n_way).to(support_features.dtype)
    sums = one_hot.transpose(1, 2) @ support_features
    return sums / one_hot.sum(1).unsqueeze(-1)


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` for ``x [T, Q, D]``, ``y [T, N, D]`` -> ``[T, Q, N]``."""
    return (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)
