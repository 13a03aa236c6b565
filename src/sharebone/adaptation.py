"""The one inner loop of gradient-based meta-learning, as a pure function of a parameter dict.

MAML, first-order MAML, ANIL and Meta-SGD differ only in what they hand to :func:`adapt`:

============  ==============================  ================  ===========================
regime        ``params`` (what adapts)        ``step_sizes``    ``first_order``
============  ==============================  ================  ===========================
MAML          backbone + head                 ``inner_lr``      False
FOMAML        backbone + head                 ``inner_lr``      True
ANIL          head only (features fixed)      ``inner_lr``      False
Meta-SGD      backbone + head                 learned tensors   False
============  ==============================  ================  ===========================

``support_loss(params, step)`` is any function of the dict (typically
:func:`torch.func.functional_call` of a model on the support set), so the loop knows nothing
about models: adapted parameters are new tensors, the module's own parameters are never
written, and the meta-gradient of a query loss computed from the result lands on whatever the
inputs were built from (the module's ``nn.Parameter`` s), so Lightning's optimizers, clipping,
precision and DDP see an ordinary backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["Params", "TransductiveBatchNorm", "adapt", "check_inner_loop", "sgd_step",
           "use_batch_statistics_"]

Params = dict[str, torch.Tensor]
SupportLoss = Callable[[Params, int], torch.Tensor]


def check_inner_loop(inner_steps: int, inner_lr: float, training: bool = True) -> None:
    """Reject settings no inner loop can run, with the reason and the fix.

    ``inner_steps=0`` is valid only when not training (evaluate the initialisation as is);
    meta-training needs at least one step, or there is nothing to meta-learn through.
    """
    low = 1 if training else 0
    if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or inner_steps < low:
        hint = (" Meta-training needs at least one adaptation step; to evaluate without "
                "adaptation set test_inner_steps=0 instead.") if training else ""
        raise ValueError(f"inner_steps must be an integer >= {low}, got {inner_steps!r}.{hint}")
    if not inner_lr > 0:  # also rejects NaN
        raise ValueError(
            f"inner_lr must be > 0, got {inner_lr!r}: it is the step size of gradient descent "
            "on the support loss (for Meta-SGD the initial value of every learned step size). "
            "MAML used 0.4 (Omniglot 5-way) and 0.01 (sinusoid).")


def sgd_step(params: Params, grads: Mapping[str, torch.Tensor],
             step_sizes: float | Mapping[str, torch.Tensor]) -> Params:
    """``theta - alpha * g`` per entry; ``alpha`` a float (MAML) or a tensor per entry (Meta-SGD,
    elementwise)."""
    if isinstance(step_sizes, Mapping):
        return {k: p - step_sizes[k] * grads[k] for k, p in params.items()}
    return {k: p - step_sizes * grads[k] for k, p in params.items()}


def _grads_autograd(support_loss: SupportLoss, params: Params, step: int,
                    create_graph: bool) -> tuple[Params, Params]:
    with torch.enable_grad():
        if create_graph:
            inputs = {k: v if v.requires_grad else v.detach().requires_grad_()
                      for k, v in params.items()}
        else:
            # First order: the support pass need not be recorded for the outer backward at all.
            inputs = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = support_loss(inputs, step)
        grads = torch.autograd.grad(loss, list(inputs.values()), create_graph=create_graph)
    return (inputs if create_graph else params), dict(zip(inputs, grads, strict=True))


def _grads_func(support_loss: SupportLoss, params: Params, step: int,
                create_graph: bool) -> tuple[Params, Params]:
    inputs = params if create_graph else {k: v.detach() for k, v in params.items()}
    grads = torch.func.grad(lambda p: support_loss(p, step))(inputs)
    return params, grads


def adapt(support_loss: SupportLoss, params: Params, steps: int,
          step_sizes: float | Mapping[str, torch.Tensor], first_order: bool = False,
          functional: bool = False) -> Params:
    """``steps`` gradient-descent steps on ``support_loss``, starting from ``params``.

    Args:
        support_loss: ``(params, step) -> scalar``; ``step`` (0-based) lets a model pick
            per-step state such as MAML++'s per-step batch-norm statistics.
        params: the parameters that adapt, by name; anything else the loss needs it closes
            over (ANIL: the backbone's features).
        steps: gradient steps; 0 returns ``params`` unchanged (the initialisation itself).
        step_sizes: ``inner_lr`` (MAML), or a tensor per entry of ``params`` (Meta-SGD).
        first_order: treat support gradients as constants (FOMAML, Finn et al. 2017 sec. 5.2):
            the meta-gradient skips the second derivatives but still reaches ``params`` through
            the identity path, and Meta-SGD's step sizes through ``alpha * g``.
        functional: take gradients with :func:`torch.func.grad` (required inside
            :func:`torch.vmap`); otherwise :func:`torch.autograd.grad` (less overhead in a loop).

    Returns:
        The adapted parameters, a new dict (``params`` and its tensors are left untouched).

    Example:
        >>> w = torch.tensor([1.0], requires_grad=True)
        >>> loss = lambda p, step: (p["w"] ** 2).sum()      # gradient 2w
        >>> adapt(loss, {"w": w}, steps=1, step_sizes=0.25)["w"]  # 1 - 0.25 * 2
        tensor([0.5000], grad_fn=<SubBackward0>)
        >>> adapt(loss, {"w": w}, steps=0, step_sizes=0.25)["w"] is w
        True
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    create_graph = not first_order
    grads_of = _grads_func if functional else _grads_autograd
    for step in range(steps):
        params, grads = grads_of(support_loss, params, step, create_graph)
        params = sgd_step(params, grads, step_sizes)
    return params


class TransductiveBatchNorm(torch.nn.Module):
    """Batch norm that always normalises with the statistics of the batch at hand.

    What MAML's reference code does at train and test time alike (no running statistics). It
    replaces ``nn.BatchNorm*d`` (same ``weight``/``bias`` names, so state dicts line up).
    Outside torch.func transforms it runs the fused ``F.batch_norm`` kernel (fast); inside them
    (:func:`torch.vmap`, :func:`torch.func.grad`) it uses plain tensor ops, because with torch
    2.14 the second derivative of ``F.batch_norm`` under ``vmap`` is wrong (1e-2 relative error
    on a conv4, where finite differences and the loop agree), while plain ops compose
    correctly with every transform.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features))
            self.bias = torch.nn.Parameter(torch.zeros(num_features))
        else:
            self.weight = self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.maybe_current_level() is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, batch statistics only"


def use_batch_statistics_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.BatchNorm*d`` in ``module`` by :class:`TransductiveBatchNorm`, in
    place, keeping its affine parameters; returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            new = TransductiveBatchNorm(child.num_features, child.eps, child.affine)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            use_batch_statistics_(child)
    return module
