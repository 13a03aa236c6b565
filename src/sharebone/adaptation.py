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

Also here: :func:`accumulate_meta_gradients` (a meta-batch's meta-gradient taken part by part,
so that one part's graph is alive at a time) and the two ways batch norm can behave in an inner
loop (:class:`TransductiveBatchNorm`, :class:`PerStepBatchNorm`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from sharebone.errors import SettingError

__all__ = ["Params", "PerStepBatchNorm", "TransductiveBatchNorm", "accumulate_meta_gradients",
           "adapt", "check_inner_loop", "dict_key", "sgd_step", "use_batch_statistics_"]

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
        raise SettingError(f"inner_steps must be an integer >= {low}, got {inner_steps!r}.{hint}")
    if not inner_lr > 0:  # also rejects NaN
        raise SettingError(
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


def _float32_step(params: Params, grads: Mapping[str, torch.Tensor],
                   step_sizes: float | Mapping[str, torch.Tensor]) -> Params:
    """:func:`sgd_step` with autocast off: under mixed precision the support pass runs in
    bf16, but parameters, their gradients and the step stay in float32."""
    device_type = next(iter(params.values())).device.type if params else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return sgd_step(params, grads, step_sizes)
    with torch.autocast(device_type, enabled=False):
        return sgd_step(params, grads, step_sizes)


def adapt(support_loss: SupportLoss, params: Params, steps: int,
          step_sizes: float | Mapping[str, torch.Tensor], first_order: bool = False,
          functional: bool = False, checkpoint: bool = False) -> Params:
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
        checkpoint: run each step under :func:`torch.utils.checkpoint.checkpoint`
            (non-reentrant): its support pass and gradient are recomputed in the outer backward
            instead of kept, so activation memory does not grow with ``steps`` (each step's
            parameters are kept). Same meta-gradient, second order included. Not with
            ``functional`` (torch.func's ``grad`` refuses the saved-tensor hooks it runs on).

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
        raise SettingError(f"steps must be >= 0, got {steps}.")
    if checkpoint and functional:
        raise SettingError("checkpoint=True cannot be combined with functional=True: "
                           "torch.func.grad does not support the saved-tensor hooks that "
                           "torch.utils.checkpoint runs on.")
    create_graph = not first_order
    grads_of = _grads_func if functional else _grads_autograd

    def one_step(params: Params, step: int) -> Params:
        params, grads = grads_of(support_loss, params, step, create_graph)
        return _float32_step(params, grads, step_sizes)

    for step in range(steps):
        if checkpoint and torch.is_grad_enabled():
            names = list(params)

            # step and names bound now: the outer backward calls this again to recompute.
            def step_fn(*values: torch.Tensor, step: int = step,
                        names: list[str] = names) -> tuple[torch.Tensor, ...]:
                return tuple(one_step(dict(zip(names, values, strict=True)), step).values())

            outputs = torch.utils.checkpoint.checkpoint(step_fn, *params.values(),
                                                        use_reentrant=False)
            params = dict(zip(names, outputs, strict=True))
        else:
            params = one_step(params, step)
    return params


def accumulate_meta_gradients(parts: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              params: Sequence[torch.Tensor],
                              num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A meta-batch's mean loss, with each part's meta-gradient taken as soon as the part is
    done, so that only one part's graph is alive at a time.

    Args:
        parts: ``(loss, outputs)`` of each part of the meta-batch in turn, best a generator
            that builds a part only when asked (after the previous part's graph is freed):
            ``loss`` the mean over the part's tasks, ``outputs`` their predictions with the
            tasks first (``[1, ...]`` for a task looped alone, ``[c, ...]`` for ``c`` tasks
            batched with :func:`torch.vmap`).
        params: what to differentiate (the module's trainable parameters).
        num_tasks: tasks in the meta-batch; a part of ``c`` tasks weighs ``c / num_tasks``.

    Returns:
        ``(loss, outputs)``: ``loss`` has the value of the mean task loss and, as its only graph,
        ``sum(p * g)`` with ``g`` the accumulated meta-gradient of every ``p`` in ``params``,
        so one ``backward`` on it (Lightning's, through DDP's hooks, clipping and loss scaling
        like any other loss) puts exactly ``g`` into ``p.grad``; ``outputs`` every part's
        outputs, detached, concatenated.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> parts = ((((x * w).sum() - 1) ** 2, x.unsqueeze(0)) for x in torch.eye(2))
        >>> loss, outputs = accumulate_meta_gradients(parts, [w], num_tasks=2)
        >>> loss.backward()
        >>> loss.item(), w.grad.tolist(), tuple(outputs.shape)  # mean of (w0 - 1)^2, (w1 - 1)^2
        (0.5, [0.0, 1.0], (2, 2))
    """
    meta_grads: list[torch.Tensor | None] = [None] * len(params)
    losses, outputs, seen = [], [], 0
    for loss, part_outputs in parts:
        size = part_outputs.shape[0]
        grads = torch.autograd.grad(loss / (num_tasks / size), params, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                # Accumulate in place, into a copy: autograd may hand one tensor to two inputs.
                meta_grads[i] = g.clone() if meta_grads[i] is None else meta_grads[i].add_(g)
        losses.append(loss.detach() * size)
        outputs.append(part_outputs.detach())
        seen += size
    if seen != num_tasks:
        raise SettingError(f"The parts held {seen} tasks, but num_tasks={num_tasks}.")
    value = torch.stack(losses).sum() / num_tasks
    carrier = sum(((p * g).sum() for p, g in zip(params, meta_grads, strict=True)
                   if g is not None), value.new_zeros(()))
    return value + (carrier - carrier.detach()), torch.cat(outputs)


def dict_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` / buffer key (no dots allowed there)."""
    return name.replace(".", "__")


class PerStepBatchNorm(torch.nn.Module):
    """MAML++'s per-step batch-norm statistics (Antoniou, Edwards & Storkey, ICLR 2019,
    arXiv:1810.09502): for every batch norm of ``backbone`` that tracks running statistics, one
    copy of them per inner step. Slot ``s`` holds inner step ``s``'s, slot ``steps`` the query
    pass's; buffers are named ``<module path, dots as __>__running_mean`` (``_var``).

    ``steps=None`` keeps nothing (transductive batch norm); :meth:`at` is then empty.
    """

    def __init__(self, backbone: torch.nn.Module, steps: int | None) -> None:
        super().__init__()
        self.steps = steps or 0
        self.names: list[str] = []
        if steps is None:
            return
        for name, module in backbone.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                if not module.track_running_stats:
                    continue
                self.names.append(name)
                for stat in ("running_mean", "running_var"):
                    buffer = getattr(module, stat).detach()
                    stacked = buffer.expand(steps + 1, *buffer.shape).clone()
                    self.register_buffer(dict_key(f"{name}.{stat}"), stacked)

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """The backbone's running statistics for inner step ``step`` (the query pass: any
        step >= ``steps``), by the backbone's buffer names, for ``functional_call``."""
        slot = min(step, self.steps)
        return {f"{name}.{stat}": self.get_buffer(dict_key(f"{name}.{stat}"))[slot]
                for name in self.names for stat in ("running_mean", "running_var")}


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

    #: A normalisation layer, for the ``norm`` selector of a sharing map.
    is_norm = True

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
        # y = x * scale + shift, with per-channel scale and shift: the only activation-sized
        # tensor autograd keeps is x itself (held by var and the product), where
        # (x - mean) * rsqrt(var) * w + b would keep three (x, x - mean and the normalised x).
        # Under vmap a chunk's activations are all alive at once: a vmapped conv4 task now
        # holds 1.24x a looped one's memory, not 1.87x (tests/test_maml_memory.py).
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        scale = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + self.eps)
        if self.weight is None:
            return x * scale - mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = scale * self.weight.view(shape)
        return x * scale + (self.bias.view(shape) - mean * scale)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, batch statistics only"


def use_batch_statistics_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``nn.BatchNorm*d`` in ``module`` by :class:`TransductiveBatchNorm`, in
    place, keeping its affine parameters; returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            if type(child).forward is not torch.nn.modules.batchnorm._BatchNorm.forward:
                # A module given by a user may fuse more into its norm (timm's BatchNormAct2d
                # adds an activation): replacing it would silently drop that.
                raise SettingError(
                    f"{type(child).__name__} ({name!r}) is a batch norm with a forward of its "
                    "own, which MAML's batch-statistics norm would replace, dropping whatever "
                    "else it computes. Split it into nn.BatchNorm2d plus the rest (as "
                    "sharebone.models.timm_backbone.plain_batch_norms_ does for timm's "
                    "BatchNormAct2d), or set batch_norm='per_step'.")
            new = TransductiveBatchNorm(child.num_features, child.eps, child.affine)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            use_batch_statistics_(child)
    return module
