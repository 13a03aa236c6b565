"""MAML and its family on one inner loop: MAML, first-order MAML, ANIL and Meta-SGD.

Per meta-batch, as in Finn et al. (2017), Algorithm 2::

    for each task i:   theta_i = adapt(theta, support_i)          # sharebone.adaptation.adapt
                       L_i     = loss(f(query_i; theta_i))
    theta <- theta - beta * grad_theta mean_i L_i                   # Lightning's optimizer step

The four regimes are presets of :class:`MAML` (their classes only change defaults):

- :class:`MAML` (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400): all parameters adapt,
  second-order meta-gradient.
- :class:`FOMAML`: ``first_order=True``, support gradients are treated as constants (the same
  paper, section 5.2).
- :class:`ANIL` (Raghu et al., ICLR 2020, arXiv:1909.09157): ``adapt="head"``, only the head
  adapts, on backbone features computed once per task.
- :class:`MetaSGD` (Li et al. 2017, arXiv:1707.09835): ``learn_step_sizes=True``, every adapted
  parameter has its own learned step size (initialised to ``inner_lr``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sharebone.adaptation import Params, adapt, check_inner_loop, use_batch_statistics_
from sharebone.data.episodes import Episode
from sharebone.models import ParameterSharing, count_parameters
from sharebone.models.heads import HEAD_INITS, LinearHead, initial_head, resize_ways
from sharebone.regimes.base import FewShotRegime, register_regime
from sharebone.task_kind import CLASSIFICATION, LOSSES, task_kind

ADAPT = ("all", "head")
HEADS = (*HEAD_INITS, "none")
BATCH_NORM = ("transductive", "per_step")
BACKENDS = ("torch_func", "learn2learn")


def _key(name: str) -> str:
    """A parameter name as a ParameterDict / buffer key (no dots allowed there)."""
    return name.replace(".", "__")


def learn2learn_available() -> bool:
    return importlib.util.find_spec("learn2learn") is not None


class _FixedLinear(nn.Module):
    """A linear layer whose weights are given tensors (the learn2learn backend's task head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self._parameters["weight"] = weight
        self._parameters["bias"] = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@register_regime("maml")
class MAML(FewShotRegime):
    """Model-agnostic meta-learning: learn an initialisation that adapts to a task in a few
    gradient steps on its support set.

    Shared: the initialisation of every parameter (backbone and head). Task-specific: all of
    them after ``inner_steps`` SGD steps on the task's support loss
    (:func:`~sharebone.adaptation.adapt`).
    Outer objective: the adapted model's query loss, averaged over the meta-batch and
    differentiated through the inner loop (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400).

    Args:
        backbone: registry spec, e.g. ``{"name": "conv4"}`` (the paper's 4-block conv net).
        n_way: ways of the training episodes (outputs of the learned head); evaluation may use
            any other n_way, see :mod:`sharebone.models.heads` for how the head then starts.
        inner_steps: SGD steps on the support set while meta-training (>= 1).
        inner_lr: their step size (Meta-SGD: the initial value of every learned step size).
        test_inner_steps: steps when not training (validation, ``sharebone-eval``); ``None``:
            ``inner_steps``. ``0`` scores the initialisation without adaptation.
        first_order: FOMAML, support gradients treated as constants (``None``: the preset's).
        adapt: ``"all"`` parameters (MAML) or ``"head"`` only (ANIL) (``None``: the preset's).
        learn_step_sizes: Meta-SGD's per-parameter step sizes, meta-learned (``None``: the
            preset's). Learned unconstrained as in the paper (alpha sets update direction as
            well as size): an entry may turn negative in meta-training; only the initial value
            must be > 0.
        head: how a task's head starts: ``"learned"`` (MAML), ``"zero"`` (zeroing trick),
            ``"proto"`` (Proto-MAML), or ``"none"`` (the backbone's output is the prediction).
        batch_norm: ``"transductive"`` (MAML's code): batch norm always normalises with the
            statistics of the batch at hand, support or query, in training and at test; no
            running statistics are kept. ``"per_step"`` (MAML++, Antoniou et al. 2019): running
            statistics kept separately for each inner step, used in eval mode (training mode
            normalises with batch statistics and updates them); cannot be combined with vmap.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression, e.g. sinusoid;
            the regime then reports MSE, lower is better).
        lr: Adam's meta learning rate (beta).
        vmap: batch the tasks of a meta-batch with :func:`torch.vmap` (True), loop over them
            (False), or ``None``: vmap on GPU, loop on CPU (3x faster there for conv4 5-way
            1-shot, scripts/bench_maml.py), and loop whenever another option needs it
            (``batch_norm="per_step"``, ``per_task_backward=True``, ``compile=True``).
        backend: ``"torch_func"`` (this package's inner loop) or ``"learn2learn"``
            (``l2l.algorithms.MAML`` / ``MetaSGD``; same numerics, for comparison).
        per_task_backward: while looping over tasks, take each task's meta-gradient as soon as
            its query loss is known and free its graph (as learn2learn's examples do), so that
            meta-training holds one task's activations instead of the whole meta-batch's; the
            loss returned then carries the accumulated meta-gradient for Lightning's backward
            (same value, same gradient). ``None``: on whenever tasks are looped. Gradients are
            taken at the loss's own scale, so with float16 mixed precision prefer bf16 or turn
            this off.
        compile: run the backbone through :func:`torch.compile` wherever it is differentiated at
            most once: every pass of first-order MAML and ANIL, the query pass of second-order
            MAML / Meta-SGD (their support pass needs a second derivative, which compiled code
            does not provide, so it stays eager), and evaluation. Compiling costs tens of
            seconds at the first meta-batch and again per new input shape; it pays off in long
            runs (scripts/bench_maml.py). Not with ``vmap``, ``batch_norm="per_step"`` or the
            learn2learn backend.

    Example:
        >>> import torch
        >>> from sharebone.data.episodes import EpisodeSampler
        >>> model = MAML({"name": "mlp", "in_features": 4, "hidden": [8]}, n_way=3,
        ...              inner_steps=1, inner_lr=0.4)
        >>> sampler = EpisodeSampler(torch.randn(30, 4), torch.arange(30) // 10, 3, 2, 4)
        >>> episode = sampler.batch([0, 1])
        >>> model.predict_episode(episode).shape  # [tasks, n_way * q_query, n_way]
        torch.Size([2, 12, 3])
        >>> loss, _ = model.episode_loss(episode)
        >>> loss.backward()                     # the meta-gradient lands on the module itself
        >>> all(p.grad is not None for p in model.parameters())
        True
        >>> print(model.parameter_sharing())
        shared=67  task-specific=67  (all parameters adapt: 1 SGD step(s) on the support set)
    """

    predicts_without_grad = False
    #: Defaults of ``first_order``, ``adapt`` and ``learn_step_sizes`` that a preset changes.
    preset: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: dict[str, Any], n_way: int = 5, inner_steps: int = 1,
                 inner_lr: float = 0.4, test_inner_steps: int | None = None,
                 first_order: bool | None = None, adapt: str | None = None,
                 learn_step_sizes: bool | None = None,
                 head: str = "learned", batch_norm: str = "transductive",
                 loss: str = "cross_entropy", lr: float = 1e-3, vmap: bool | None = None,
                 backend: str = "torch_func", per_task_backward: bool | None = None,
                 compile: bool = False) -> None:
        super().__init__(backbone)
        # FOMAML, ANIL and Meta-SGD are presets: they change only these defaults (`preset`);
        # an explicit argument wins. Resolved before save_hyperparameters, so checkpoints hold
        # the values actually used.
        if first_order is None:
            first_order = self.preset.get("first_order", False)
        if adapt is None:
            adapt = self.preset.get("adapt", "all")
        if learn_step_sizes is None:
            learn_step_sizes = self.preset.get("learn_step_sizes", False)
        check_inner_loop(inner_steps, inner_lr, training=True)
        if test_inner_steps is not None:
            check_inner_loop(test_inner_steps, inner_lr, training=False)
        for name, value, allowed in (("adapt", adapt, ADAPT), ("head", head, HEADS),
                                     ("batch_norm", batch_norm, BATCH_NORM),
                                     ("loss", loss, LOSSES), ("backend", backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if adapt == "head" and head == "none":
            raise ValueError(
                "adapt='head' (ANIL) adapts only the head, but this model has none (head='none'): "
                "there would be nothing to adapt. Give it a head (head='learned', 'zero' or "
                "'proto') or adapt all parameters (adapt='all', MAML).")
        if head == "proto" and task_kind(loss) is not CLASSIFICATION:
            raise ValueError("head='proto' (Proto-MAML) builds a classifier from class means; it "
                             "needs loss='cross_entropy'. Use head='learned' for regression.")
        if vmap and batch_norm == "per_step":
            raise ValueError(
                "vmap=True cannot be combined with batch_norm='per_step': per-step running "
                "statistics are updated in place, which torch.vmap cannot batch across tasks. "
                "Use vmap=False (loop over tasks) or batch_norm='transductive'.")
        if vmap and per_task_backward:
            raise ValueError(
                "per_task_backward=True needs the tasks looped (vmap=False or null): torch.vmap "
                "computes the whole meta-batch in one pass, so there is no task to free early.")
        if compile and (vmap or batch_norm == "per_step" or backend == "learn2learn"):
            raise ValueError(
                "compile=True runs sharebone's own looped inner loop through torch.compile; it "
                "cannot be combined with vmap=True, batch_norm='per_step' (running statistics "
                "updated in place) or backend='learn2learn'. Drop one of them.")
        if backend == "learn2learn":
            if not learn2learn_available():
                raise ImportError("backend='learn2learn' needs learn2learn: run "
                                  "scripts/install_learn2learn.sh, or use backend='torch_func'.")
            if vmap:
                raise ValueError("vmap=True needs backend='torch_func'; learn2learn loops.")
            if batch_norm != "transductive":
                raise ValueError("backend='learn2learn' supports batch_norm='transductive' only.")
        if n_way < 1:
            raise ValueError(f"n_way must be >= 1, got {n_way}.")
        self.save_hyperparameters()
        self.task_kind = task_kind(loss)

        if batch_norm == "transductive":
            # No running statistics: batch norm uses the current batch's, in train and eval mode
            # alike (Finn et al.'s implementation), and the model can run under torch.vmap.
            use_batch_statistics_(self.backbone)
        self.head = (None if head == "none" else
                     LinearHead(self.backbone.num_features, n_way, init=head))
        self.per_step_bn = nn.Module()
        self._bn_names: list[str] = []
        if batch_norm == "per_step":
            self._init_per_step_bn(inner_steps)
        self.step_sizes = nn.ParameterDict()
        if learn_step_sizes:
            for name, shape in self._adapted_shapes().items():
                self.step_sizes[_key(name)] = nn.Parameter(torch.full(shape, float(inner_lr)))

    # -- options ---------------------------------------------------------------------------
    @property
    def test_inner_steps(self) -> int:
        steps = self.hparams.test_inner_steps
        return self.hparams.inner_steps if steps is None else steps

    def _use_vmap(self) -> bool:
        vmap = self.hparams.vmap
        if vmap is None:  # auto: vmap on accelerators, unless another option needs the loop
            looped = (self._bn_names or self.hparams.per_task_backward
                      or self.hparams.compile or self.hparams.backend == "learn2learn")
            return self.device.type != "cpu" and not looped
        return bool(vmap)

    def _use_per_task_backward(self) -> bool:
        """Meta-training through the loop, unless turned off (see ``per_task_backward``)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return self.hparams.per_task_backward is not False and not self._use_vmap()

    def _adapted_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if self.hparams.adapt == "all":
            shapes.update({f"backbone.{k}": tuple(p.shape)
                           for k, p in self.backbone.named_parameters()})
        if self.head is not None:
            n, d = self.hparams.n_way, self.backbone.num_features
            shapes.update({"head.weight": (n, d), "head.bias": (n,)})
        return shapes

    def _init_per_step_bn(self, inner_steps: int) -> None:
        # Slot s holds the statistics of inner step s; slot inner_steps those of the query pass.
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not module.track_running_stats:
                    continue
                self._bn_names.append(name)
                for stat in ("running_mean", "running_var"):
                    buffer = getattr(module, stat).detach()
                    stacked = buffer.expand(inner_steps + 1, *buffer.shape).clone()
                    self.per_step_bn.register_buffer(_key(f"{name}.{stat}"), stacked)

    def _bn_buffers(self, step: int) -> dict[str, torch.Tensor]:
        if not self._bn_names:
            return {}
        slot = min(step, self.hparams.inner_steps)
        return {f"{name}.{stat}": self.per_step_bn.get_buffer(_key(f"{name}.{stat}"))[slot]
                for name in self._bn_names for stat in ("running_mean", "running_var")}

    # -- the model as a function of its parameters -------------------------------------------
    def features(self, params: Params, x: torch.Tensor, step: int = 0,
                 twice_differentiable: bool = False) -> torch.Tensor:
        """Backbone features of ``x`` under ``params`` (``backbone.*`` entries; the module's own
        parameters for those absent), with inner step ``step``'s batch-norm statistics.
        ``twice_differentiable``: the pass will be differentiated twice (second-order support
        pass), so it must not run compiled code."""
        backbone = {k[9:]: v for k, v in params.items() if k.startswith("backbone.")}
        if self.hparams.compile and not twice_differentiable:
            own = dict(self.backbone.named_parameters())
            return self._compiled_backbone()(own | backbone, x)
        backbone.update(self._bn_buffers(step))
        if not backbone:
            return self.backbone(x)
        return functional_call(self.backbone, backbone, (x,))

    def _compiled_backbone(self) -> Callable[[Params, torch.Tensor], torch.Tensor]:
        # Built on first use and kept out of pickles/copies (see __getstate__): a compiled
        # function is a cache of generated code, not part of the model.
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            backbone = self.backbone

            def backbone_fn(params: Params, x: torch.Tensor) -> torch.Tensor:
                return functional_call(backbone, params, (x,))

            compiled = self.__dict__["_compiled"] = torch.compile(backbone_fn)
        return compiled

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled", None)
        return state

    def forward_with(self, params: Params, x: torch.Tensor, step: int = 0,
                     twice_differentiable: bool = False) -> torch.Tensor:
        """Predictions for inputs ``x`` ``[M, *input]`` under ``params`` -> ``[M, n_way]``."""
        features = self.features(params, x, step, twice_differentiable)
        if self.head is None:
            return features
        return F.linear(features, params["head.weight"], params["head.bias"])

    def task_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task_kind.loss(predictions, targets)

    def _step_sizes(self, params: Params, n_way: int) -> float | dict[str, torch.Tensor]:
        if not self.hparams.learn_step_sizes:
            return self.hparams.inner_lr
        sizes = {}
        for name in params:
            alpha = self.step_sizes[_key(name)]
            sizes[name] = resize_ways(alpha, n_way) if name.startswith("head.") else alpha
        return sizes

    def _initial_params(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                        support_features: torch.Tensor | None,
                        twice_differentiable: bool = False) -> Params:
        params: Params = {}
        if self.hparams.adapt == "all":
            params.update({f"backbone.{k}": p for k, p in self.backbone.named_parameters()})
        if self.head is not None:
            if self.hparams.head == "proto" and support_features is None:
                # Proto-MAML: when every parameter adapts with second-order gradients, the
                # support gradient reaches the backbone through these prototypes too.
                support_features = self.features({}, support, 0, twice_differentiable)
            head = initial_head(self.head, n_way, support_features, support_labels,
                                like=support)
            params.update({f"head.{k}": v for k, v in head.items()})
        return params

    # -- one task ---------------------------------------------------------------------------
    def adapt_task(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                   steps: int, first_order: bool, functional: bool = False
                   ) -> tuple[Params, torch.Tensor | None]:
        """Adapted parameters of one task (ANIL: the head only) and, for ANIL, the support
        features they act on. ``support [S, *input]``, ``support_labels [S]`` (or ``[S, 1]``
        regression targets)."""
        fixed_features = None
        if self.hparams.adapt == "head":
            fixed_features = self.features({}, support, 0)
        params = self._initial_params(support, support_labels, n_way, fixed_features,
                                      twice_differentiable=not first_order)
        step_sizes = self._step_sizes(params, n_way)
        if fixed_features is not None:
            def support_loss(p: Params, step: int) -> torch.Tensor:
                logits = F.linear(fixed_features, p["head.weight"], p["head.bias"])
                return self.task_loss(logits, support_labels)
        else:
            def support_loss(p: Params, step: int) -> torch.Tensor:
                predictions = self.forward_with(p, support, step,
                                                twice_differentiable=not first_order)
                return self.task_loss(predictions, support_labels)
        adapted = adapt(support_loss, params, steps, step_sizes, first_order=first_order,
                        functional=functional)
        return adapted, fixed_features

    def _task_predictions(self, support: torch.Tensor, support_labels: torch.Tensor,
                          query: torch.Tensor, n_way: int, steps: int, first_order: bool,
                          functional: bool = False, meta_gradient: bool = True) -> torch.Tensor:
        adapted, _ = self.adapt_task(support, support_labels, n_way, steps, first_order,
                                     functional)
        # Without a meta-gradient to take, the query pass keeps no graph: evaluating a
        # meta-batch then needs one task's activations at a time, not all of them.
        with contextlib.nullcontext() if meta_gradient else torch.no_grad():
            if self.hparams.adapt == "head":
                features = self.features({}, query, 0)
                return F.linear(features, adapted["head.weight"], adapted["head.bias"])
            return self.forward_with(adapted, query, steps)

    def _task_predictions_l2l(self, support: torch.Tensor, support_labels: torch.Tensor,
                              query: torch.Tensor, n_way: int, steps: int, first_order: bool,
                              meta_gradient: bool = True) -> torch.Tensor:
        import learn2learn as l2l

        head_only = self.hparams.adapt == "head"
        if head_only:
            support, query = self.features({}, support, 0), self.features({}, query, 0)
        init = self._initial_params(support, support_labels, n_way,
                                    support if head_only else None)
        modules: list[nn.Module] = [] if head_only else [self.backbone]
        if self.head is not None:
            # A zero head is a fresh constant: learn2learn differentiates with respect to it.
            head = {k: v if v.requires_grad else v.requires_grad_() for k, v in init.items()
                    if k.startswith("head.")}
            modules.append(_FixedLinear(head["head.weight"], head["head.bias"]))
        net = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        if self.hparams.learn_step_sizes:
            sizes = self._step_sizes(init, n_way)
            # net.parameters() order: backbone's, then the head's, as in _initial_params.
            learner = l2l.algorithms.MetaSGD(net, lrs=[sizes[k] for k in init],
                                             first_order=first_order)
        else:
            learner = l2l.algorithms.MAML(net, lr=self.hparams.inner_lr, first_order=first_order)
        learner = learner.clone()
        for _ in range(steps):
            learner.adapt(self.task_loss(learner(support), support_labels))
        with contextlib.nullcontext() if meta_gradient else torch.no_grad():
            return learner(query)

    # -- the regime's interface --------------------------------------------------------------
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Query predictions ``[T, Q, n_way]`` (logits; regression: ``[T, Q, 1]``), each task
        adapted on its own support set. Meta-training (``self.training`` with gradients on)
        keeps the graph for the meta-gradient; otherwise support gradients are constants and
        the predictions carry no graph (nothing will differentiate through them), so
        evaluation holds one task's activations at a time."""
        task = self._task_function(episode.n_way)
        if self._use_vmap():
            if self._bn_names:
                raise ValueError("vmap cannot batch batch_norm='per_step' (running statistics are "
                                 "updated in place); set vmap=False.")
            return torch.vmap(functools.partial(task, functional=True), randomness="same")(
                episode.support, episode.support_labels, episode.query)
        return torch.stack([task(*args) for args in zip(
            episode.support, episode.support_labels, episode.query, strict=True)])

    def _task_function(self, n_way: int) -> Callable[..., torch.Tensor]:
        """``(support, support_labels, query) -> query predictions`` of one task, with the
        inner loop of the current mode (meta-training, or evaluation) and backend."""
        training = self.training and torch.is_grad_enabled()
        steps = self.hparams.inner_steps if self.training else self.test_inner_steps
        first_order = self.hparams.first_order or not training
        task = (self._task_predictions_l2l if self.hparams.backend == "learn2learn"
                else self._task_predictions)
        return functools.partial(task, n_way=n_way, steps=steps, first_order=first_order,
                                 meta_gradient=training)

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        if self._use_per_task_backward():
            return self._episode_loss_per_task(episode)
        return super().episode_loss(episode)

    def _episode_loss_per_task(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-batch's loss with each task's meta-gradient taken as soon as the task is
        done, so that only one task's graph is alive at a time.

        The loss returned has the value of the meta-batch's query loss and, as its only graph,
        ``sum(p * g)`` with ``g`` the accumulated meta-gradient of every parameter ``p``:
        Lightning's ``backward`` on it puts exactly ``g`` into ``p.grad`` (through DDP's hooks,
        clipping and loss scaling like any other loss).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        meta_grads: list[torch.Tensor | None] = [None] * len(params)
        losses, predictions = [], []
        tasks = episode.num_tasks
        task = self._task_function(episode.n_way)
        for args in zip(episode.support, episode.support_labels, episode.query,
                        episode.query_labels, strict=True):
            task_predictions = task(*args[:3])
            # The meta-batch loss is the mean of the tasks' losses (equal query sets).
            loss = self.task_loss(task_predictions, args[3])
            grads = torch.autograd.grad(loss / tasks, params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    # Accumulate in place, into a copy: autograd may hand one tensor to two inputs.
                    meta_grads[i] = g.clone() if meta_grads[i] is None else meta_grads[i].add_(g)
            losses.append(loss.detach())
            predictions.append(task_predictions.detach())
        carrier = sum((p * g).sum() for p, g in zip(params, meta_grads, strict=True)
                      if g is not None)
        loss = torch.stack(losses).mean() + (carrier - carrier.detach())
        return loss, torch.stack(predictions)

    def parameter_sharing(self) -> ParameterSharing:
        backbone = count_parameters(self.backbone)
        learned_head = count_parameters(self.head)
        head = 0 if self.head is None else self.hparams.n_way * (self.backbone.num_features + 1)
        meta = count_parameters(self.step_sizes)
        steps = f"{self.hparams.inner_steps} {'Meta-SGD' if meta else 'SGD'} step(s)"
        if self.hparams.adapt == "head":
            return ParameterSharing(
                shared=backbone + learned_head, task_specific=head, meta=meta,
                description=f"head adapts ({self.hparams.head} init): {steps} on support "
                            "features of a fixed backbone")
        return ParameterSharing(shared=backbone + learned_head, task_specific=backbone + head,
                                meta=meta, description=f"all parameters adapt: {steps} on the "
                                                       "support set")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@register_regime("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400, section 5.2):
    :class:`MAML` with ``first_order=True``: the support gradients are treated as constants, so
    the meta-gradient is the query gradient at the adapted parameters (no second derivatives,
    less memory, nearly the same accuracy in the paper).

    Example:
        >>> model = FOMAML({"name": "mlp", "in_features": 4, "hidden": [8]}, n_way=3)
        >>> model.hparams.first_order, model.regime_name
        (True, 'fomaml')
    """

    preset: ClassVar[dict[str, Any]] = {"first_order": True}


@register_regime("anil")
class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, arXiv:1909.09157):
    :class:`MAML` with ``adapt="head"``. The backbone is shared and not adapted; a task's
    features are computed once and only the head takes inner steps, which is as accurate as
    MAML in the paper and much cheaper.

    Example:
        >>> model = ANIL({"name": "mlp", "in_features": 4, "hidden": [8]}, n_way=3)
        >>> sharing = model.parameter_sharing()  # 4*8+8 backbone + 3*(8+1) head; head adapts
        >>> sharing.shared, sharing.task_specific
        (67, 27)
    """

    preset: ClassVar[dict[str, Any]] = {"adapt": "head"}


@register_regime("metasgd")
class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835): :class:`MAML` with
    ``learn_step_sizes=True``. Every adapted parameter has its own step size ``alpha`` (same
    shape, initialised to ``inner_lr``), meta-learned with the initialisation:
    ``theta_i = theta - alpha * grad`` elementwise. The paper adapts in one step.

    ``alpha`` is learned unconstrained, as in the paper: it encodes the update direction as
    well as its size, so entries may become negative during meta-training.

    Example:
        >>> model = MetaSGD({"name": "mlp", "in_features": 1, "hidden": [40, 40]}, n_way=1,
        ...                 inner_lr=0.01, loss="mse")
        >>> sharing = model.parameter_sharing()
        >>> sharing.shared == sharing.meta == 1761, model.metric_name   # the 1-40-40-1 net
        (True, 'mse')
    """

    preset: ClassVar[dict[str, Any]] = {"learn_step_sizes": True}
