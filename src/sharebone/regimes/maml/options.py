"""The options of the MAML family's inner loop, and which of their combinations can run.

:class:`~sharebone.regimes.maml.regime.MAML` takes these as keyword arguments (the names Hydra
configs
and saved checkpoints use) and keeps them in its ``hparams``; :class:`MAMLOptions` reads them
from there, typed, and refuses, with the reason and the fix, every setting that cannot run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from sharebone.adaptation import check_inner_loop
from sharebone.errors import SettingError
from sharebone.models.heads import HEAD_INITS
from sharebone.regimes.maml.l2l import learn2learn_available
from sharebone.task_kind import CLASSIFICATION, LOSSES, TaskKind, task_kind

__all__ = ["ADAPT", "BACKENDS", "BATCH_NORM", "HEADS", "OPTION_NAMES", "MAMLOptions"]

ADAPT = ("all", "head")
HEADS = (*HEAD_INITS, "none")
BATCH_NORM = ("transductive", "per_step")
BACKENDS = ("torch_func", "learn2learn")


#: What ``test_inner_steps: auto`` chooses from, on validation episodes after training (the
#: sharing study's MAML runs chose 10, then the largest, every time: hence 20).
AUTO_TEST_STEPS = (0, 1, 2, 3, 5, 10, 20)


@dataclass(frozen=True)
class MAMLOptions:
    """How a MAML-family model adapts to a task. FOMAML, ANIL and Meta-SGD are MAML with
    ``first_order``, ``adapt="head"`` and ``learn_step_sizes`` changed.

    Attributes:
        n_way: ways of the training episodes (outputs of the learned head). Meta-training on
            episodes of another n_way is refused; evaluation may use any n_way, see
            :mod:`sharebone.models.heads` for how the head then starts.
        inner_steps: SGD steps on the support set while meta-training (>= 1).
        inner_lr: their step size (Meta-SGD: the initial value of every learned step size).
        test_inner_steps: steps when not training (validation, ``sharebone-eval``); ``None``:
            ``inner_steps``. ``0`` scores the initialisation without adaptation. ``"auto"``:
            chosen on validation episodes after training (``sharebone-train``, from
            :data:`AUTO_TEST_STEPS`) and stored in the checkpoint; ``inner_steps`` until then.
        first_order: FOMAML, support gradients treated as constants.
        adapt: ``"all"`` parameters (MAML) or ``"head"`` only (ANIL).
        learn_step_sizes: Meta-SGD's per-parameter step sizes, meta-learned. Learned
            unconstrained as in the paper (alpha sets update direction as well as size): an
            entry may turn negative in meta-training; only the initial value must be > 0.
        head: how a task's head starts: ``"learned"`` (MAML), ``"zero"`` (zeroing trick),
            ``"proto"`` (Proto-MAML), or ``"none"`` (the backbone's output is the prediction).
        batch_norm: ``"transductive"`` (MAML's code): batch norm always normalises with the
            statistics of the batch at hand, support or query, in training and at test; no
            running statistics are kept. ``"per_step"`` (MAML++, Antoniou et al. 2019): running
            statistics kept separately for each inner step, used in eval mode (training mode
            normalises with batch statistics and updates them); cannot be combined with vmap.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression, e.g. sinusoid;
            the regime then reports MSE, lower is better): :mod:`sharebone.task_kind`.
        vmap: batch the tasks of a meta-batch with :func:`torch.vmap` (True), loop over them
            (False), or ``None``: vmap on GPU, loop on CPU (3x faster there for conv4 5-way
            1-shot, scripts/bench_maml.py), and loop whenever another option needs it
            (``batch_norm="per_step"``, ``per_task_backward=True``, ``compile=True``,
            ``checkpoint_inner_steps=True``); ``vmap_chunk_size`` set: vmap.
        backend: ``"torch_func"`` (this package's inner loop) or ``"learn2learn"``
            (``l2l.algorithms.MAML`` / ``MetaSGD``; same numerics, for comparison).
        per_task_backward: while looping over tasks, take each task's meta-gradient as soon as
            its query loss is known and free its graph (as learn2learn's examples do), so that
            meta-training holds one task's activations instead of the whole meta-batch's
            (:func:`sharebone.adaptation.accumulate_meta_gradients`; same value, same
            gradient). ``None``: on whenever tasks are looped. Gradients are taken at the loss's
            own scale, so with float16 mixed precision prefer bf16 or turn this off.
        compile: run the backbone through :func:`torch.compile` wherever it is differentiated at
            most once: every pass of first-order MAML and ANIL, the query pass of second-order
            MAML / Meta-SGD (their support pass needs a second derivative, which compiled code
            does not provide, so it stays eager), and evaluation. Compiling costs tens of
            seconds at the first meta-batch and again per new input shape; it pays off in long
            runs (scripts/bench_maml.py). Not with ``vmap``, ``batch_norm="per_step"`` or the
            learn2learn backend.
        vmap_chunk_size: meta-train a vmapped meta-batch as chunks of this many tasks, each
            chunk's meta-gradient taken as soon as the chunk is done
            (:func:`sharebone.adaptation.accumulate_meta_gradients`, as
            ``per_task_backward``
            does per task), so memory holds one chunk's graph, not the meta-batch's; same loss,
            same meta-gradient. A size that does not divide the meta-batch leaves a short last
            chunk. ``"auto"``: on CUDA, the first chunk is one task, whose peak memory sets the
            size of the others (:func:`sharebone.regimes.maml.chunking.auto_chunk_size`); on CPU
            the whole
            meta-batch is one chunk (CPU memory is not the limit vmap hits there). ``None``: no
            chunking. Setting it turns vmap on (``vmap=None``); not with ``vmap=False``,
            ``batch_norm="per_step"``, ``compile`` or the learn2learn backend.
        checkpoint_inner_steps: recompute each inner step's support pass (forward and, for
            second order, its gradient) in the backward pass instead of keeping its activations
            (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant), so activation memory no
            longer grows with ``inner_steps``; one set of adapted parameters per step is still
            kept. Costs one more support pass per step. Needs the tasks looped (torch.func's
            ``grad`` under vmap refuses saved-tensor hooks); not with ``vmap=True``,
            ``vmap_chunk_size``, ``batch_norm="per_step"`` (recomputing would update the
            running statistics twice), ``compile`` or the learn2learn backend.

    Example:
        >>> MAMLOptions(n_way=5, adapt="head").adapts_backbone
        False
        >>> MAMLOptions(head="proto", loss="mse")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: head='proto' (Proto-MAML) builds a classifier ...
    """

    n_way: int = 5
    inner_steps: int = 1
    inner_lr: float = 0.4
    test_inner_steps: int | str | None = None
    first_order: bool = False
    adapt: str = "all"
    learn_step_sizes: bool = False
    head: str = "learned"
    batch_norm: str = "transductive"
    loss: str = "cross_entropy"
    vmap: bool | None = None
    backend: str = "torch_func"
    per_task_backward: bool | None = None
    compile: bool = False
    vmap_chunk_size: int | str | None = None
    checkpoint_inner_steps: bool = False

    def __post_init__(self) -> None:
        check_inner_loop(self.inner_steps, self.inner_lr, training=True)
        if self.test_inner_steps not in (None, "auto"):
            check_inner_loop(self.test_inner_steps, self.inner_lr, training=False)
        for name, allowed in (("adapt", ADAPT), ("head", HEADS), ("batch_norm", BATCH_NORM),
                              ("loss", LOSSES), ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise SettingError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        self._check_combinations()
        self._check_memory_options()
        if self.backend == "learn2learn":
            self._check_learn2learn()
        if self.n_way < 1:
            raise SettingError(f"n_way must be >= 1, got {self.n_way}.")

    def _check_combinations(self) -> None:
        if self.adapt == "head" and self.head == "none":
            raise SettingError(
                "adapt='head' (ANIL) adapts only the head, but this model has none (head='none'): "
                "there would be nothing to adapt. Give it a head (head='learned', 'zero' or "
                "'proto') or adapt all parameters (adapt='all', MAML).")
        if self.head == "proto" and self.kind is not CLASSIFICATION:
            raise SettingError("head='proto' (Proto-MAML) builds a classifier from class means; it "
                               "needs loss='cross_entropy'. Use head='learned' for regression.")
        if self.vmap and self.batch_norm == "per_step":
            raise SettingError(
                "vmap=True cannot be combined with batch_norm='per_step': per-step running "
                "statistics are updated in place, which torch.vmap cannot batch across tasks. "
                "Use vmap=False (loop over tasks) or batch_norm='transductive'.")
        if self.vmap and self.per_task_backward:
            raise SettingError(
                "per_task_backward=True needs the tasks looped (vmap=False or null): torch.vmap "
                "computes the whole meta-batch in one pass, so there is no task to free early.")
        if self.compile and (self.vmap or self.batch_norm == "per_step"
                             or self.backend == "learn2learn"):
            raise SettingError(
                "compile=True runs sharebone's own looped inner loop through torch.compile; it "
                "cannot be combined with vmap=True, batch_norm='per_step' (running statistics "
                "updated in place) or backend='learn2learn'. Drop one of them.")

    def _check_memory_options(self) -> None:
        chunk = self.vmap_chunk_size
        if chunk is not None:
            if chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                    or chunk < 1):
                raise SettingError(f"vmap_chunk_size must be an integer >= 1, 'auto' or null (no "
                                   f"chunking), got {chunk!r}.")
            clash = [text for cond, text in (
                (self.vmap is False, "vmap=False (chunks are vmapped; the loop already takes "
                                     "each task's meta-gradient alone, per_task_backward)"),
                (self.batch_norm == "per_step", "batch_norm='per_step' (running statistics "
                                                "updated in place cannot be vmapped)"),
                (self.per_task_backward, "per_task_backward=True (a looped meta-batch)"),
                (self.compile, "compile=True (compiles the looped path)"),
                (self.backend == "learn2learn", "backend='learn2learn' (loops)"),
                (self.checkpoint_inner_steps, "checkpoint_inner_steps=True (needs the tasks "
                                              "looped)"),
            ) if cond]
            if clash:
                raise SettingError(f"vmap_chunk_size={chunk!r} runs the meta-batch as vmapped "
                                   f"chunks; it cannot be combined with {clash[0]}. Drop one of "
                                   "them.")
        if self.checkpoint_inner_steps:
            clash = [text for cond, text in (
                (self.vmap, "vmap=True (torch.func.grad under vmap refuses the saved-tensor "
                            "hooks checkpointing runs on; use vmap=False)"),
                (self.batch_norm == "per_step", "batch_norm='per_step' (recomputing a step "
                                                "would update its running statistics twice)"),
                (self.compile, "compile=True"),
                (self.backend == "learn2learn", "backend='learn2learn' (its own inner loop)"),
            ) if cond]
            if clash:
                raise SettingError("checkpoint_inner_steps=True recomputes each inner step of "
                                   "sharebone's looped inner loop; it cannot be combined with "
                                   f"{clash[0]}. Drop one of them.")

    def _check_learn2learn(self) -> None:
        if not learn2learn_available():
            raise ImportError("backend='learn2learn' needs learn2learn: run "
                              "scripts/install_learn2learn.sh, or use backend='torch_func'.")
        if self.vmap:
            raise SettingError("vmap=True needs backend='torch_func'; learn2learn loops.")
        if self.batch_norm != "transductive":
            raise SettingError("backend='learn2learn' supports batch_norm='transductive' only.")

    @classmethod
    def of(cls, hparams: dict[str, Any]) -> MAMLOptions:
        """The options among a MAML model's ``hparams`` (which also hold ``backbone``, ``lr``)."""
        return cls(**{name: hparams[name] for name in OPTION_NAMES})

    # -- what follows from them --------------------------------------------------------------
    @property
    def kind(self) -> TaskKind:
        """Classification or regression (``loss``)."""
        return task_kind(self.loss)

    @property
    def adapts_backbone(self) -> bool:
        """MAML, FOMAML, Meta-SGD: yes; ANIL: only the head adapts."""
        return self.adapt == "all"

    @property
    def test_steps(self) -> int:
        """Inner steps when not training."""
        return (self.inner_steps if self.test_inner_steps in (None, "auto")
                else self.test_inner_steps)

    def uses_vmap(self, device_type: str) -> bool:
        """Batch a meta-batch's tasks with vmap (else loop over them): ``vmap`` if set; by
        default on accelerators, unless another option needs the loop."""
        if self.vmap is not None:
            return bool(self.vmap)
        if self.vmap_chunk_size is not None:
            return True
        looped = (self.batch_norm == "per_step" or self.per_task_backward or self.compile
                  or self.backend == "learn2learn" or self.checkpoint_inner_steps)
        return device_type != "cpu" and not looped

    @property
    def learns_per_way(self) -> bool:
        """Whether a meta-learned tensor has one row per way: a learned head, or Meta-SGD's
        step sizes of any head. Such a model meta-trains at its own ``n_way`` only."""
        return self.head != "none" and (self.head == "learned" or self.learn_step_sizes)


#: The MAML constructor's arguments that are inner-loop options (all but ``backbone``, ``lr``).
OPTION_NAMES = tuple(f.name for f in fields(MAMLOptions))


def refuse_inapplicable(options: MAMLOptions, method: str,
                        rows: Iterable[tuple[str, bool, str]]) -> None:
    """Refuse the first ``(key, set, why)`` row whose option is set: ``regime.<key>`` does not
    apply to ``method``, and why (the options a MAML subclass cannot honour)."""
    for key, bad, why in rows:
        if bad:
            raise SettingError(f"regime.{key}={getattr(options, key)!r} does not apply to "
                               f"{method} ({why}). Fix: drop regime.{key}.")
