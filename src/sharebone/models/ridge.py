"""Differentiable closed-form heads: a task's classifier is ridge regression on its support set.

R2D2 (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019, arXiv:1805.08136) fits, per task, ridge
regression from support features ``X [S, D]`` to one-hot labels ``Y [S, n_way]`` in Woodbury
(dual) form, ``W = X^T (X X^T + lam I_S)^-1 Y``: an ``S x S`` solve, small when ``S << D``. The
query logits are ``scale * X_q W + bias`` with ``scale``, ``bias`` and ``lam`` meta-learned.
MetaOptNet's ridge head (Lee, Maji, Ravichandran & Soatto, CVPR 2019, arXiv:1904.03758) is the
same solve with a fixed ``lam`` (50) and a learned scale only. Both are differentiable, so the
backbone meta-trains through the solve. When ``S > D`` the primal form
``(X^T X + lam I_D)^-1 X^T Y`` is the smaller solve; they are equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sharebone.errors import SettingError

__all__ = ["RIDGE_HEADS", "RidgeHead", "ridge_weights"]

#: ``head`` -> (lam learned, bias learned, default lam).
RIDGE_HEADS = {"r2d2": (True, True, 1.0), "ridge": (False, False, 50.0)}


def ridge_weights(features: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor | float,
                  form: str = "auto") -> torch.Tensor:
    """Per-task ridge regression weights ``W [T, D, O]`` minimising
    ``||X W - Y||^2 + lam ||W||^2`` for ``features X [T, S, D]``, ``targets Y [T, S, O]``.

    ``form``: ``"dual"`` (Woodbury: ``X^T (X X^T + lam I)^-1 Y``), ``"primal"``
    (``(X^T X + lam I)^-1 X^T Y``) or ``"auto"`` (the smaller system).

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
        >>> ridge_weights(x, torch.eye(2).unsqueeze(0), lam=1.0).squeeze(0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.4000]])
    """
    samples, dim = features.shape[-2:]
    if form == "auto":
        form = "dual" if samples <= dim else "primal"
    if form == "dual":
        gram = features @ features.transpose(-1, -2)
        eye = torch.eye(samples, dtype=gram.dtype, device=gram.device)
        return features.transpose(-1, -2) @ torch.linalg.solve(gram + lam * eye, targets)
    if form != "primal":
        raise SettingError(f"ridge form must be 'auto', 'dual' or 'primal', got {form!r}.")
    gram = features.transpose(-1, -2) @ features
    eye = torch.eye(dim, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, features.transpose(-1, -2) @ targets)


class RidgeHead(nn.Module):
    """A task's classifier in closed form from its support set, with meta-learned calibration.

    Args:
        head: ``"r2d2"`` (learned ``lam``, scale and bias) or ``"ridge"`` (MetaOptNet: fixed
            ``lam``, learned scale).
        lam: the regulariser (its initial value when learned); ``None``: 1.0 for ``r2d2``,
            50.0 for ``ridge`` (MetaOptNet's).
        scale: the logits' initial scale (learned).
        max_way: the most ways it scores, or ``None`` (any: the solve does not depend on the
            number of ways). A head sized for a fixed output width sets it; an episode with more
            ways is refused.

    Example:
        >>> head = RidgeHead("r2d2", lam=1.0, scale=1.0)
        >>> support = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])       # one task, two ways
        >>> logits = head(support, torch.tensor([[0, 1]]), torch.tensor([[[2.0, 0.0]]]), 2)
        >>> logits.argmax(-1)
        tensor([[0]])
    """

    def __init__(self, head: str = "r2d2", lam: float | None = None, scale: float = 1.0,
                 max_way: int | None = None) -> None:
        super().__init__()
        if head not in RIDGE_HEADS:
            raise SettingError(f"regime.head must be one of {tuple(RIDGE_HEADS)}, got {head!r}.")
        learn_lam, learn_bias, default_lam = RIDGE_HEADS[head]
        lam = default_lam if lam is None else lam
        if not lam > 0:
            raise SettingError(f"regime.lam must be > 0 (ridge regression's regulariser), got "
                               f"{lam!r}. Fix: regime.lam={default_lam}.")
        if not scale > 0:
            raise SettingError(f"regime.scale must be > 0 (the logits' initial scale), got "
                               f"{scale!r}. Fix: regime.scale=1.0.")
        if max_way is not None and (isinstance(max_way, bool) or max_way < 2):
            raise SettingError(f"regime.max_way must be an integer >= 2 or null, got "
                               f"{max_way!r}.")
        self.kind, self.max_way = head, max_way
        # lam > 0 always: learned as its logarithm; a fixed one stays a plain number.
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam))) if learn_lam else None
        self.fixed_lam = float(lam)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.zeros(())) if learn_bias else None

    @property
    def lam(self) -> torch.Tensor | float:
        return self.fixed_lam if self.log_lam is None else self.log_lam.exp()

    def weights(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        """Each task's ridge weights ``[T, D, n_way]`` from ``support [T, S, D]``, ``labels
        [T, S]``."""
        if self.max_way is not None and n_way > self.max_way:
            raise SettingError(
                f"This ridge head was built for at most {self.max_way} ways "
                f"(regime.max_way={self.max_way}) and was asked for {n_way}. Fix: set "
                f"regime.max_way={n_way} or null (any number of ways).")
        targets = F.one_hot(labels, n_way).to(support.dtype)
        lam = self.lam
        return ridge_weights(support, targets,
                             lam if isinstance(lam, float) else lam.to(support.dtype))

    def forward(self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor,
                n_way: int) -> torch.Tensor:
        """Query logits ``[T, Q, n_way]``: ``scale * query @ W (+ bias)``."""
        logits = self.scale * (query @ self.weights(support, labels, n_way))
        return logits if self.bias is None else logits + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, max_way={self.max_way}"
