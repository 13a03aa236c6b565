"""MAML and its family on one inner loop: MAML, first-order MAML, ANIL and Meta-SGD.

Per meta-batch, as in Finn et al. (2017), Algorithm 2::

    for each task i:   theta_i = adapt(theta, support_i)          #
    sharebone.adaptation.adapt
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

Reptile and iMAML (:mod:`~sharebone.regimes.maml.reptile`, :mod:`~sharebone.regimes.maml.imaml`)
are subclasses that take another outer step on the same inner problem
(:meth:`MAML.task_problem`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sharebone.adaptation import (
    Params,
    PerStepBatchNorm,
    accumulate_meta_gradients,
    adapt,
    check_inner_loop,
    dict_key,
    use_batch_statistics_,
)
from sharebone.data.episodes import Episode
from sharebone.errors import SettingError
from sharebone.memory import PeakMemory
from sharebone.models import BackboneArg, ParameterSharing, count_parameters, feature_width
from sharebone.models.heads import LinearHead, initial_head, resize_ways
from sharebone.models.sharing import (
    PRESETS,
    SharingMap,
    last_block,
    norm_parameters,
    role_counts,
)
from sharebone.models.timm_backbone import plain_batch_norms_
from sharebone.regimes.base import FewShotRegime, register_regime
from sharebone.regimes.maml import chunking
from sharebone.regimes.maml.options import AUTO_TEST_STEPS, OPTION_NAMES, MAMLOptions
from sharebone.regimes.maml.precision import check_autocast, check_bf16_supported
from sharebone.task_kind import TaskKind


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
        backbone: registry spec, e.g. ``{"name": "conv4"}`` (the paper's 4-block conv net), or
            a module of one's own (a pure function of its parameters, as
            :func:`torch.func.functional_call` needs; ``num_features`` its output width).
        lr: Adam's meta learning rate (beta).
        n_way, inner_steps, inner_lr, test_inner_steps, first_order, adapt, learn_step_sizes,
        head, batch_norm, loss, vmap, backend, per_task_backward, compile, vmap_chunk_size,
        checkpoint_inner_steps: the inner loop's
            options, documented and validated by
            :class:`~sharebone.regimes.maml.options.MAMLOptions` (read back from ``hparams``
            as :attr:`options`). ``first_order``, ``adapt`` and ``learn_step_sizes`` left
            ``None`` take the preset's values (FOMAML, ANIL, Meta-SGD), else MAML's.
        sharing: a :class:`~sharebone.models.sharing.SharingMap` or its plain form
            (``{"adapt": [...], "frozen": [...]}``, a config's ``sharing``): which parameters
            adapt in the inner loop (``adapt``, replacing the ``adapt`` option when set) and
            which are ``frozen`` (no gradient at all); the rest is meta-learned (shared).
            ``None``: the ``adapt`` option, which stands for the ``all`` / ``head`` presets.
            Kept in ``hparams`` as plain data, so checkpoints rebuild it.

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
        >>> print(model.parameter_sharing())  # doctest: +NORMALIZE_WHITESPACE
        shared=67  task-specific=67  (all parameters adapt: 1 SGD step(s) on the support set)
          roles: shared=0 adapt=67 task=0 frozen=0
    """

    predicts_without_grad = False
    follows_sharing_map = True
    #: Defaults of ``first_order``, ``adapt`` and ``learn_step_sizes`` that a preset changes.
    preset: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: BackboneArg, n_way: int = 5, inner_steps: int = 1,
                 inner_lr: float = 0.4, test_inner_steps: int | str | None = None,
                 first_order: bool | None = None, adapt: str | None = None,
                 learn_step_sizes: bool | None = None,
                 head: str = "learned", batch_norm: str = "transductive",
                 loss: str = "cross_entropy", lr: float = 1e-3, vmap: bool | None = None,
                 backend: str = "torch_func", per_task_backward: bool | None = None,
                 compile: bool = False, vmap_chunk_size: int | str | None = None,
                 checkpoint_inner_steps: bool = False,
                 sharing: SharingMap | dict[str, Any] | None = None) -> None:
        super().__init__(backbone, sharing, adapters_now=False)
        # Presets change only these defaults; an explicit argument wins. Resolved before
        # save_hyperparameters (which reads these locals), so checkpoints hold the values used.
        if first_order is None:
            first_order = self.preset.get("first_order", False)
        if adapt is None:
            adapt = self.preset.get("adapt", "all")
        if learn_step_sizes is None:
            learn_step_sizes = self.preset.get("learn_step_sizes", False)
        sharing_map = SharingMap.of(sharing)  # plain data in hparams (checkpoints load it)
        sharing = None if sharing_map is None else sharing_map.as_dict()
        self.save_hyperparameters()
        MAMLOptions.of(self.hparams)  # refuses, before anything is built, what cannot run

        if batch_norm == "transductive":
            # No running statistics: batch norm uses the current batch's, in train and eval mode
            # alike (Finn et al.'s implementation), and the model can run under torch.vmap.
            # timm's fused norm + activation (in a timm model given as a module) is split
            # first, so that only the norm is replaced.
            use_batch_statistics_(plain_batch_norms_(self.backbone))
        self.add_adapters()  # after the norms are replaced: FiLM wraps the norm in use
        self.head = (None if head == "none" else
                     LinearHead(feature_width(self.backbone), n_way, init=head))
        self.per_step_bn = PerStepBatchNorm(self.backbone,
                                            inner_steps if batch_norm == "per_step" else None)
        #: The role of every backbone and head parameter (``backbone.*``, ``head.weight``,
        #: ``head.bias``, the head's even when a task makes it: ``head="zero"|"proto"``).
        self.sharing_roles: dict[str, str] = self._resolve_sharing(sharing_map)
        own = dict(self.named_parameters())
        for name, role in self.sharing_roles.items():
            if role == "frozen" and name in own:
                own[name].requires_grad_(False)  # no gradient, so no optimizer step
        self.step_sizes = nn.ParameterDict()
        if learn_step_sizes:
            for name, shape in self.adapted_shapes().items():
                self.step_sizes[dict_key(name)] = nn.Parameter(torch.full(shape, float(inner_lr)))
        self.check_family_options()

    def check_family_options(self) -> None:
        """Refuse what a member of the family cannot run (Reptile, iMAML override it); called
        once the options and the sharing roles are known."""

    # -- the sharing map ---------------------------------------------------------------------
    def mapped_shapes(self, n_way: int | None = None) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters a sharing map assigns roles to, the head's at ``n_way``."""
        n_way = self.options.n_way if n_way is None else n_way
        shapes = {f"backbone.{k}": tuple(p.shape) for k, p in self.backbone.named_parameters()}
        if self.head is not None:
            shapes.update({"head.weight": (n_way, self.head.in_features),
                           "head.bias": (n_way,)})
        return shapes

    def _resolve_sharing(self, sharing_map: SharingMap | None) -> dict[str, str]:
        """Every mapped parameter's role under ``sharing_map`` (``adapt`` unset: the ``adapt``
        option's preset); refuses what the MAML family cannot do, naming the key."""
        option = self.options.adapt
        source = f"regime.adapt={option!r}"
        if sharing_map is None:
            sharing_map = PRESETS[option]
        elif sharing_map.adapt is None:
            sharing_map = sharing_map.with_adapt(PRESETS[option].adapt)
        else:
            source = "sharing.adapt"
        names = list(self.mapped_shapes())
        roles = sharing_map.resolve(
            names, norm=norm_parameters(self.backbone, "backbone."),
            blocks={"last_block": last_block(self.backbone, "backbone.")}, adapt_source=source)
        if "task" in roles.values():
            raise SettingError(
                "sharing.task: the MAML family has no fresh per-task part yet (a task's head "
                "starts as regime.head=learned|zero|proto says). Leave sharing.task empty, "
                "and adapt that part instead (sharing.adapt).")
        adapted = [n for n, r in roles.items() if r == "adapt"]
        if not adapted:
            raise SettingError(f"{source}: nothing adapts; the MAML family adapts at least one "
                               "parameter per task (e.g. sharing=head).")
        if self.options.backend == "learn2learn" and adapted not in (
                names, [n for n in names if n.startswith("head.")]):
            raise SettingError(
                "sharing.adapt: backend='learn2learn' adapts whole modules, so only every "
                "parameter (sharing=all) or the head (sharing=head); use backend=torch_func "
                "for other maps.")
        return roles

    @property
    def test_time(self) -> None:
        """None: the inner loop is this family's adaptation, at test time too."""
        return None

    def auto_settings(self) -> dict[str, tuple[Any, ...]]:
        """``regime.test_inner_steps`` when it is ``auto``, with :data:`AUTO_TEST_STEPS`."""
        if self.hparams.get("test_inner_steps") != "auto":
            return {}
        return {"regime.test_inner_steps": AUTO_TEST_STEPS}

    @property
    def adapts_backbone(self) -> bool:
        """Whether any backbone parameter adapts (MAML, BOIL, ...); if not (ANIL), a task's
        features are computed once and only the head takes inner steps."""
        return any(r == "adapt" and n.startswith("backbone.")
                   for n, r in self.sharing_roles.items())

    # -- options ---------------------------------------------------------------------------
    @property
    def options(self) -> MAMLOptions:
        """The inner loop's options, typed and validated, read from ``hparams``: those stay the
        one record (checkpoints save them; ``sharebone-eval`` may set ``test_inner_steps`` on
        a loaded model), so a change there is seen here, and checked."""
        hparams = self.hparams
        values = tuple(map(hparams.get, OPTION_NAMES))
        cached = self.__dict__.get("_options")
        if cached is None or cached[0] != values:
            cached = self.__dict__["_options"] = (values, MAMLOptions.of(hparams))
        return cached[1]

    @property
    def task_kind(self) -> TaskKind:
        return self.options.kind

    @property
    def test_inner_steps(self) -> int:
        """Inner steps when not training: ``test_inner_steps`` (``inner_steps`` if unset), or
        the count an evaluation asked for inside :meth:`scoring_with`."""
        asked = self.__dict__.get("_scoring_steps")
        return self.options.test_steps if asked is None else asked

    @contextlib.contextmanager
    def scoring_with(self, inner_steps: int) -> Iterator[None]:
        """Adapt with ``inner_steps`` steps when not training, inside the block. An evaluation's
        setting, not a hyperparameter: nothing a checkpoint saves or a logger logs changes."""
        check_inner_loop(inner_steps, self.options.inner_lr, training=False)
        previous = self.__dict__.get("_scoring_steps")
        self.__dict__["_scoring_steps"] = int(inner_steps)
        try:
            yield
        finally:
            self.__dict__["_scoring_steps"] = previous

    def adapted_shapes(self, n_way: int | None = None) -> dict[str, tuple[int, ...]]:
        """Which parameters adapt to a task, by name, and their shapes at ``n_way`` ways (the
        trained ``n_way`` by default): the ``adapt`` role of :attr:`sharing_roles` (by default
        the backbone's and the head's; ANIL: the head's), backbone first. The one place that
        says it: a task's initial parameters, Meta-SGD's step sizes and
        :meth:`parameter_sharing` all follow it."""
        return {name: shape for name, shape in self.mapped_shapes(n_way).items()
                if self.sharing_roles[name] == "adapt"}

    def _use_vmap(self) -> bool:
        return self.options.uses_vmap(self.device.type)

    def _use_per_task_backward(self) -> bool:
        """Meta-training through the loop, unless turned off (see ``per_task_backward``)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return self.options.per_task_backward is not False and not self._use_vmap()

    def _use_chunked_meta_gradients(self) -> bool:
        """Meta-training a vmapped meta-batch chunk by chunk (``vmap_chunk_size``)."""
        return (self.training and torch.is_grad_enabled() and self._use_vmap()
                and self.options.vmap_chunk_size is not None)

    def _chunks(self, episode: Episode) -> Iterator[slice]:
        """The chunks a vmapped meta-batch runs in (``vmap_chunk_size``), lazily: with
        ``"auto"`` on CUDA the first chunk of the first meta-batch of a shape is one task,
        measured, and the memory it peaked at sizes the rest and every later meta-batch of
        that shape (:mod:`sharebone.regimes.maml.chunking`). The last size chosen is kept as
        ``auto_chunk_size`` (in ``vars(self)``) for logs and benchmarks."""
        num_tasks = episode.num_tasks
        size = self.options.vmap_chunk_size
        if size is None:
            yield slice(0, num_tasks)
            return
        if size != "auto":
            yield from chunking.chunk_slices(num_tasks, size)
            return
        if chunking.free_device_bytes(self.device) is None or num_tasks == 1:
            self.__dict__["auto_chunk_size"] = num_tasks
            yield slice(0, num_tasks)
            return
        known = self.__dict__.setdefault("_auto_chunk_sizes", {})
        shape = (tuple(episode.support.shape[1:]), tuple(episode.query.shape[1:]),
                 self.training and torch.is_grad_enabled())
        if shape in known:
            self.__dict__["auto_chunk_size"] = known[shape]
            yield from chunking.chunk_slices(num_tasks, known[shape])
            return
        probe = PeakMemory(self.device)
        probe.start()
        yield slice(0, 1)
        # The caller has taken the first chunk's meta-gradient (its graph is freed) by now.
        size = chunking.auto_chunk_size(chunking.free_device_bytes(self.device),
                                        probe.bytes_used(), num_tasks - 1)
        self.__dict__["auto_chunk_size"] = known[shape] = size
        for rest in chunking.chunk_slices(num_tasks - 1, size):
            yield slice(rest.start + 1, rest.stop + 1)

    def on_fit_start(self) -> None:
        """Refuse bf16 precision on a GPU without bf16 before the first step."""
        check_bf16_supported(self.trainer.precision, self.device)

    # -- the model as a function of its parameters -------------------------------------------
    def features(self, params: Params, x: torch.Tensor, step: int = 0,
                 twice_differentiable: bool = False) -> torch.Tensor:
        """Backbone features of ``x`` under ``params`` (``backbone.*`` entries; the module's own
        parameters for those absent), with inner step ``step``'s batch-norm statistics.
        ``twice_differentiable``: the pass will be differentiated twice (second-order support
        pass), so it must not run compiled code."""
        backbone = {k[9:]: v for k, v in params.items() if k.startswith("backbone.")}
        if self.options.compile and not twice_differentiable:
            own = dict(self.backbone.named_parameters())
            return self._compiled_backbone()(own | backbone, x)
        backbone.update(self.per_step_bn.at(step))
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
        state.pop("_auto_chunk_sizes", None)  # measured on this device, for this process
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

    def inner_step_sizes(self, params: Params, n_way: int) -> float | dict[str, torch.Tensor]:
        """``inner_lr``, or Meta-SGD's learned step size of every entry of ``params``."""
        if not self.options.learn_step_sizes:
            return self.options.inner_lr
        sizes = {}
        for name in params:
            alpha = self.step_sizes[dict_key(name)]
            sizes[name] = resize_ways(alpha, n_way) if name.startswith("head.") else alpha
        return sizes

    def initial_params(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                       support_features: torch.Tensor | None = None,
                       twice_differentiable: bool = False) -> Params:
        """What a task's adaptation starts from: every entry of :meth:`adapted_shapes` at
        ``n_way``, in its order; the head as its ``head`` option says
        (:func:`~sharebone.models.heads.initial_head`), from ``support_features`` for
        Proto-MAML (computed here when not given)."""
        return self._task_start(support, support_labels, n_way, support_features,
                                twice_differentiable)[0]

    def _task_start(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                    support_features: torch.Tensor | None = None,
                    twice_differentiable: bool = False) -> tuple[Params, Params]:
        """:meth:`initial_params`, and the task's head entries that do not adapt (the head as
        a task starts it, held fixed in the inner loop: BOIL, BitFit's head weight)."""
        head: Params = {}
        if self.head is not None:
            if self.options.head == "proto" and support_features is None:
                # Proto-MAML: when every parameter adapts with second-order gradients, the
                # support gradient reaches the backbone through these prototypes too.
                support_features = self.features({}, support, 0, twice_differentiable)
            init = initial_head(self.head, n_way, support_features, support_labels, like=support)
            head = {f"head.{k}": v for k, v in init.items()}
        own = dict(self.named_parameters())
        adapted = {name: head[name] if name in head else own[name]
                   for name in self.adapted_shapes(n_way)}
        return adapted, {k: v for k, v in head.items() if k not in adapted}

    # -- one task ---------------------------------------------------------------------------
    def task_problem(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                     twice_differentiable: bool = False,
                     ) -> tuple[Params, Params, Callable[[Params, int], torch.Tensor],
                                torch.Tensor | None]:
        """A task's inner problem: the parameters adaptation starts from (the ``adapt`` role),
        the task's head entries that do not adapt, ``support_loss(params, step)`` and, when no
        backbone parameter adapts (ANIL), the support features it acts on. What every inner
        loop of the family (MAML's, Reptile's, iMAML's proximal one) descends on."""
        fixed_features = None
        if not self.adapts_backbone:
            fixed_features = self.features({}, support, 0)
        params, fixed = self._task_start(support, support_labels, n_way, fixed_features,
                                         twice_differentiable=twice_differentiable)
        if fixed_features is not None:
            def support_loss(p: Params, step: int) -> torch.Tensor:
                p = p | fixed
                logits = F.linear(fixed_features, p["head.weight"], p["head.bias"])
                return self.task_loss(logits, support_labels)
        else:
            def support_loss(p: Params, step: int) -> torch.Tensor:
                predictions = self.forward_with(p | fixed, support, step,
                                                twice_differentiable=twice_differentiable)
                return self.task_loss(predictions, support_labels)
        return params, fixed, support_loss, fixed_features

    def adapt_task(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                   steps: int, first_order: bool, functional: bool = False,
                   checkpoint: bool = False) -> tuple[Params, torch.Tensor | None]:
        """Adapted parameters of one task (the ``adapt`` role; ANIL: the head only), with the
        task's head entries that do not adapt, and, when no backbone parameter adapts (ANIL),
        the support features they act on. ``support [S, *input]``, ``support_labels [S]``
        (regression targets: ``[S, 1]``)."""
        params, fixed, support_loss, fixed_features = self.task_problem(
            support, support_labels, n_way, twice_differentiable=not first_order)
        step_sizes = self.inner_step_sizes(params, n_way)
        adapted = adapt(support_loss, params, steps, step_sizes, first_order=first_order,
                        functional=functional, checkpoint=checkpoint)
        return adapted | fixed, fixed_features

    def predict_with(self, adapted: Params, query: torch.Tensor, step: int,
                     twice_differentiable: bool = False) -> torch.Tensor:
        """Query predictions under a task's adapted parameters (ANIL: on the fixed backbone's
        features)."""
        if not self.adapts_backbone:
            features = self.features({}, query, 0)
            return F.linear(features, adapted["head.weight"], adapted["head.bias"])
        return self.forward_with(adapted, query, step, twice_differentiable)

    def _task_predictions(self, support: torch.Tensor, support_labels: torch.Tensor,
                          query: torch.Tensor, n_way: int, steps: int, first_order: bool,
                          functional: bool = False, meta_gradient: bool = True,
                          checkpoint: bool = False) -> torch.Tensor:
        adapted, _ = self.adapt_task(support, support_labels, n_way, steps, first_order,
                                     functional, checkpoint and meta_gradient)
        # Without a meta-gradient to take, the query pass keeps no graph: evaluating a
        # meta-batch then needs one task's activations at a time, not all of them.
        with contextlib.nullcontext() if meta_gradient else torch.no_grad():
            return self.predict_with(adapted, query, steps)

    def _task_function(self, n_way: int) -> Callable[..., torch.Tensor]:
        """``(support, support_labels, query) -> query predictions`` of one task, with the
        inner loop of the current mode (meta-training, or evaluation) and backend."""
        options = self.options
        training = self.training and torch.is_grad_enabled()
        if training:
            self._check_training_ways(n_way)
        check_autocast(self.device.type)
        steps = options.inner_steps if self.training else self.test_inner_steps
        if options.backend == "learn2learn":
            from sharebone.regimes.maml.l2l import task_predictions

            task = functools.partial(task_predictions, self)
        else:
            task = functools.partial(self._task_predictions,
                                     checkpoint=options.checkpoint_inner_steps)
        return functools.partial(task, n_way=n_way, steps=steps,
                                 first_order=options.first_order or not training,
                                 meta_gradient=training)

    def _check_training_ways(self, n_way: int) -> None:
        trained = self.options.n_way
        if n_way != trained and self.options.learns_per_way:
            learned = ("head is" if self.options.head == "learned"
                       else "head's step sizes (Meta-SGD) are")
            raise SettingError(
                f"Meta-training on {n_way}-way episodes, but this model's {learned} learned "
                f"for n_way={trained}: their rows would all start from their mean at every "
                f"step. Set the regime's n_way to {n_way} (regime.n_way; the configs take it "
                f"from sampler.train.n_way), or train on {trained}-way episodes. Other n_way "
                "are for evaluation, where head=learned|zero|proto says how the head starts.")

    # -- the regime's interface --------------------------------------------------------------
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Query predictions ``[T, Q, n_way]`` (logits; regression: ``[T, Q, 1]``), each task
        adapted on its own support set. Meta-training (``self.training`` with gradients on)
        keeps the graph for the meta-gradient; otherwise support gradients are constants and
        the predictions carry no graph (nothing will differentiate through them), so
        evaluation holds one task's activations at a time."""
        episode = self.model_input(episode)
        task = self._task_function(episode.n_way)
        if self._use_vmap():
            chunks = [self._vmapped(task, episode, chunk)
                      for chunk in self._chunks(episode)]
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return torch.stack([task(*args) for args in zip(
            episode.support, episode.support_labels, episode.query, strict=True)])

    @staticmethod
    def _vmapped(task: Callable[..., torch.Tensor], episode: Episode,
                 chunk: slice) -> torch.Tensor:
        """Query predictions of the tasks ``chunk`` of ``episode``, batched with vmap."""
        return torch.vmap(functools.partial(task, functional=True), randomness="same")(
            episode.support[chunk], episode.support_labels[chunk], episode.query[chunk])

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-batch's query loss and predictions. Looped meta-training takes each task's
        meta-gradient as soon as the task is done (``per_task_backward``), chunked vmapped
        meta-training each chunk's (``vmap_chunk_size``), both with
        :func:`~sharebone.adaptation.accumulate_meta_gradients`."""
        episode = self.model_input(episode)
        params = [p for p in self.parameters() if p.requires_grad]
        if self._use_chunked_meta_gradients():
            task = self._task_function(episode.n_way)

            def chunks():
                for chunk in self._chunks(episode):
                    predictions = self._vmapped(task, episode, chunk)
                    yield self.task_loss(predictions, episode.query_labels[chunk]), predictions

            return accumulate_meta_gradients(chunks(), params, episode.num_tasks)
        if not self._use_per_task_backward():
            return super().episode_loss(episode)
        task = self._task_function(episode.n_way)

        def tasks():
            for support, support_labels, query, query_labels in zip(
                    episode.support, episode.support_labels, episode.query,
                    episode.query_labels, strict=True):
                predictions = task(support, support_labels, query)
                yield self.task_loss(predictions, query_labels), predictions.unsqueeze(0)

        return accumulate_meta_gradients(tasks(), params, episode.num_tasks)

    def parameter_sharing(self) -> ParameterSharing:
        options = self.options
        meta = count_parameters(self.step_sizes)
        steps = f"{options.inner_steps} {'Meta-SGD' if meta else 'SGD'} step(s)"
        adapted = self.adapted_shapes()
        if self.hparams.get("sharing") is not None:
            how = (f"{len(adapted)} of {len(self.sharing_roles)} tensors adapt (sharing map): "
                   f"{steps} on the support set")
        elif self.adapts_backbone:
            how = f"all parameters adapt: {steps} on the support set"
        else:
            how = (f"head adapts ({options.head} init): {steps} on support features of a "
                   "fixed backbone")
        sizes = {n: math.prod(s) for n, s in self.mapped_shapes().items()}
        return ParameterSharing(
            shared=count_parameters(self.backbone) + count_parameters(self.head),
            task_specific=sum(math.prod(s) for s in adapted.values()),
            meta=meta, description=how, roles=role_counts(self.sharing_roles, sizes))


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
