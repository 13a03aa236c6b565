"""What every regime shares: episodes in, per-task predictions out, one way to log them."""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from sharebone.callbacks.cadence import logs_this_step
from sharebone.data.episodes import Episode, RaggedEpisodes
from sharebone.errors import SettingError
from sharebone.models import BackboneArg, ParameterSharing, build_backbone
from sharebone.models.adapters import inject_adapters
from sharebone.models.sharing import SharingMap, with_roles
from sharebone.regimes.test_time import (
    CANDIDATES,
    FineTuning,
    finetuned_features,
    prototype_loss,
    resolve_roles,
)
from sharebone.registry import Registry
from sharebone.task_kind import CLASSIFICATION, TaskKind, accuracy

__all__ = ["REGIMES", "FewShotRegime", "accuracy", "register_regime"]

REGIMES: Registry[type[pl.LightningModule]] = Registry("regime")
OptimizerFactory = Callable[[list[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
SharingArg = SharingMap | dict[str, Any] | None


def create_regime(name: str, **kwargs: Any) -> FewShotRegime:
    """Build a regime by its registered name: what Hydra configs (``_target_`` this function,
    ``name: maml``) and checkpoint loading both call.

    Example:
        >>> create_regime("protonet", backbone={"name": "mlp", "in_features": 4}).regime_name
        'protonet'
    """
    return REGIMES.create(name, **kwargs)


def register_regime(name: str):
    """Class decorator: make a regime buildable by name (and loadable from its checkpoints)."""

    def decorator(cls: type[FewShotRegime]) -> type[FewShotRegime]:
        REGIMES.register(name)(cls)
        cls.regime_name = name
        return cls

    return decorator


class FewShotRegime(pl.LightningModule):
    """A shared backbone plus a rule for obtaining a task's specific part.

    Subclasses answer the project's three questions: which parameters are shared
    (:meth:`parameter_sharing`), how a task's part is obtained from its support set
    (:meth:`predict_episode`), and which outer loss trains the shared part
    (:meth:`episode_loss`). Training, validation and few-shot evaluation then work alike for
    every regime: same episodes, same metrics.

    Args:
        backbone: the backbone's registry spec, e.g. ``{"name": "conv4", "in_channels": 1}``
            (a checkpoint rebuilds it by name), or a module of one's own, used as it is (not
            copied: MAML replaces its batch norms with batch-statistics ones; regimes with a
            head read its width from ``num_features``). A checkpoint records such a module by
            its class only; ``load_regime(path, backbone=MyNet())`` loads the weights into a
            new one.

    Episodes with uint8 images (as an :class:`~sharebone.data.episodes.EpisodeSampler`
    returns them) are turned into floats in ``[0, 1]`` by :meth:`model_input`
    (:meth:`Episode.to_float`, what the data module does for a sampler without a
    ``transform``); a sampler's augmentation or normalisation is its own, applied by
    ``sampler.prepare(episode)`` before the episode reaches the regime.
    """

    regime_name: str = "base"
    #: Classification or regression: the loss, the per-episode score few-shot evaluation
    #: reports, and its name (regimes with a ``loss`` option set it from there).
    task_kind: TaskKind = CLASSIFICATION
    #: False when predicting needs gradients (MAML adapts on the support set).
    predicts_without_grad: bool = True
    #: Whether the regime takes a ``sharing`` map (:class:`~sharebone.models.sharing.SharingMap`:
    #: which parameters adapt per task, which are frozen, which adapters to add). The MAML
    #: family adapts in its inner loop; the embedding regimes (ProtoNet, pre-training,
    #: multitask) fine-tune the ``adapt`` set on each support set at test time.
    follows_sharing_map: bool = False
    #: Whether the ``task`` role (and ``sharing.branch_at``) makes per-task copies of backbone
    #: parameters: multitask's branches (:mod:`sharebone.regimes.branches`).
    makes_task_copies: bool = False
    #: What the regime trains on; :mod:`sharebone.run.build` makes the data for it:
    #: ``episodes`` (meta-batches of few-shot episodes), ``tasks`` (task-balanced batches of
    #: the family's training tasks, a head each), ``classes`` (batches over every training
    #: class as one task), ``new_task`` (a split's classes as a new task, images held out).
    trains_on: str = "episodes"

    def __init__(self, backbone: BackboneArg, sharing: SharingArg = None,
                 adapters_now: bool = True) -> None:
        super().__init__()
        self.backbone, record = build_backbone(backbone)
        #: The run's sharing map (``None``: the regime's own behaviour); its roles are resolved
        #: by :meth:`apply_sharing` once the subclass has built every part.
        self.sharing_map: SharingMap | None = SharingMap.of(sharing)
        #: Names (``backbone.<...>``) of the parameters ``sharing.adapters`` added.
        self.adapter_names: list[str] = []
        #: The role of every parameter under :attr:`sharing_map` (``None``: no map).
        self.sharing_roles: dict[str, str] | None = None
        if adapters_now:  # MAML first makes its norms use batch statistics, then adds them
            self.add_adapters()
        #: A backbone given as a module is saved in ``hparams`` as this record (its class),
        #: not as the module (see :meth:`save_hyperparameters`).
        self._module_record = record if isinstance(backbone, torch.nn.Module) else None
        #: ``params -> Optimizer`` and ``optimizer -> LR scheduler`` from the run's config
        #: (``optimizer=`` / ``scheduler=`` groups, ``_partial_`` Hydra configs); unset, the
        #: regime's own defaults (:meth:`default_optimizer`, :meth:`default_scheduler`).
        self.optimizer_factory: OptimizerFactory | None = None
        self.scheduler_factory: SchedulerFactory | None = None

    # -- the sharing map --------------------------------------------------------------------
    def add_adapters(self) -> list[str]:
        """Inject ``sharing.adapters`` (FiLM, residual adapters, LoRA) into the backbone, once;
        the added parameters' names, ``backbone.<...>``. A checkpoint's ``hparams`` hold the
        map, so loading one injects the same modules before its weights are read."""
        spec = self.sharing_map.adapters if self.sharing_map is not None else None
        if spec and not self.adapter_names:
            options = {k: v for k, v in spec.items() if k != "kind"}
            added = inject_adapters(self.backbone, spec["kind"], **options)
            self.adapter_names = [f"backbone.{name}" for name in added]
        return self.adapter_names

    def apply_sharing(self) -> None:
        """Resolve :attr:`sharing_map` over this model's parameters and apply it: ``frozen``
        parameters get no gradient; ``adapt`` ones (backbone parameters) are fine-tuned on each
        support set at test time (:mod:`sharebone.regimes.test_time`). Called at the end of
        an embedding regime's ``__init__``, so a bad map is refused before any data is read."""
        if self.sharing_map is None:
            return
        roles = resolve_roles(self.sharing_map, self, self.regime_name,
                              task_copies=self.makes_task_copies)
        own = dict(self.named_parameters())
        for name, role in roles.items():
            if role == "frozen":
                own[name].requires_grad_(False)
        self.sharing_roles = roles

    def mapped_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters a sharing map assigns roles to: all of them, by name."""
        return {name: tuple(p.shape) for name, p in self.named_parameters()}

    @property
    def test_time(self) -> FineTuning | None:
        """The test-time fine-tuning the map asks for (``None``: none), read from ``hparams``
        each time, so a choice made on validation (``test_steps: auto``) is what is used."""
        if self.sharing_roles is None:
            return None
        return FineTuning.of(self.hparams.get("sharing"), self.sharing_roles)

    def auto_settings(self) -> dict[str, tuple[Any, ...]]:
        """The test-time settings left to ``auto``, by config key (``sharing.test_steps``),
        each with the candidates :mod:`sharebone.evaluation.tuning` chooses from."""
        sharing = self.hparams.get("sharing") or {}
        if self.test_time is None:
            return {}
        return {f"sharing.{key}": candidates for key, candidates in CANDIDATES.items()
                if sharing.get(key) == "auto"}

    def set_test_setting(self, key: str, value: Any) -> None:
        """Set a test-time setting by its config key (``sharing.test_steps``,
        ``regime.test_inner_steps``) in ``hparams``, which checkpoints save."""
        group, _, name = key.partition(".")
        target = self.hparams["sharing"] if group == "sharing" else self.hparams
        target[name] = value

    def support_loss(self, support: torch.Tensor, labels: torch.Tensor,
                     n_way: int) -> torch.Tensor:
        """The loss test-time fine-tuning lowers on a support set's features ``[S, D]``: the
        prototypical loss with the support set as its own queries (Hu et al. 2022's P>M>F)."""
        return prototype_loss(support, labels, n_way)

    @property
    def metric_name(self) -> str:
        """``"acc"``, or ``"mse"`` for regression: logged as ``train/<metric>``, ``val/...``."""
        return self.task_kind.metric_name

    @property
    def metric_higher_is_better(self) -> bool:
        return self.task_kind.higher_is_better

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: types.FrameType | None = None, logger: bool = True) -> None:
        """Lightning's, except that a backbone given as a module is recorded by its class
        (plain values, so checkpoints load with ``weights_only=True``); its weights are in the
        state dict anyway."""
        frame = frame or inspect.currentframe().f_back  # the caller's __init__, as Lightning's
        if self._module_record is not None:
            ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
            ignore.append("backbone")
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        if self._module_record is not None:
            self.hparams["backbone"] = dict(self._module_record)
            self._hparams_initial["backbone"] = dict(self._module_record)

    @staticmethod
    def model_input(episode: Episode) -> Episode:
        """``episode`` with uint8 images turned into floats in ``[0, 1]``
        (:meth:`Episode.to_float`); float episodes as they are. Every ``predict_episode`` and
        ``episode_loss`` starts here, so an episode straight from an
        :class:`~sharebone.data.episodes.EpisodeSampler` can be given as it is. A single
        episode (``sampler[i]``) is refused: regimes take meta-batches."""
        if episode.classes.dim() != 2:
            raise SettingError(
                f"Regimes take a meta-batch of episodes (support [tasks, n_way * k_shot, ...]), "
                f"got a single episode (classes of shape {tuple(episode.classes.shape)}): use "
                f"sampler.batch([i]) instead of sampler[i].")
        if episode.support.dtype == torch.uint8 or episode.query.dtype == torch.uint8:
            return episode.to_float()
        return episode

    # -- what a regime defines ---------------------------------------------------------------
    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Logits ``[T, n_way * q_query, n_way]`` for the query set of each task, given only
        that task's support set."""
        raise NotImplementedError

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Outer loss (a scalar) and query predictions of a meta-batch. Default: the task kind's
        loss (cross-entropy, or MSE) on :meth:`predict_episode`."""
        predictions = self.predict_episode(self.model_input(episode))
        return self.task_kind.loss(predictions, episode.query_labels), predictions

    def parameter_sharing(self) -> ParameterSharing:
        raise NotImplementedError

    def sharing_counts(self) -> ParameterSharing:
        """:meth:`parameter_sharing` with the count of every role and of the parameters the
        adapters added: what runs print, log and write beside their results."""
        return with_roles(self.parameter_sharing(), self)

    def episode_metric(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-task score ``[T]`` of query predictions (accuracy; regression regimes: MSE)."""
        return self.task_kind.metric(predictions, labels)

    # -- what most regimes share ----------------------------------------------------------
    def embed_episode(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query features, ``[T, S, D]`` and ``[T, Q, D]``: both sets go through
        the backbone together (one call for the meta-batch, one batch-norm batch)."""
        episode = self.model_input(episode)
        fine_tuning = None if self.training else self.test_time
        if fine_tuning is not None and fine_tuning.steps > 0:
            return finetuned_features(self, episode, fine_tuning)
        images = torch.cat([episode.support, episode.query], dim=1)
        features = self.features(images.flatten(0, 1)).view(*images.shape[:2], -1)
        n_support = episode.support.shape[1]
        return features[:, :n_support], features[:, n_support:]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """A new task's features of ``images [B, ...]``: the backbone's (multitask with
        branches: every task's branch side by side)."""
        return self.backbone(images)

    def prediction_context(self) -> contextlib.AbstractContextManager:
        """``no_grad`` for predicting, unless the regime needs gradients to predict (MAML
        adapts on the support set even at test time)."""
        return torch.no_grad() if self.predicts_without_grad else torch.enable_grad()

    def loss_and_scores(self, episode: Episode | RaggedEpisodes
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-batch's outer loss and per-task scores ``[T]``. A ragged meta-batch
        (variable-shape episodes, :class:`~sharebone.data.episodes.RaggedEpisodes`) is one
        :meth:`episode_loss` per task, averaged: the mean of the task losses, as a fixed
        meta-batch's is (MAML's per-task meta-gradients included)."""
        if isinstance(episode, RaggedEpisodes):
            parts = [self.loss_and_scores(task) for task in episode.tasks()]
            return (torch.stack([loss for loss, _ in parts]).mean(),
                    torch.cat([scores for _, scores in parts]))
        loss, logits = self.episode_loss(episode)
        return loss, self.episode_metric(logits.detach(), episode.query_labels)

    def task_predictions(self, episode: Episode | RaggedEpisodes
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(query predictions, query labels)`` of each part of a meta-batch: the whole
        meta-batch, or each task of a ragged one (their shapes differ)."""
        parts = episode.tasks() if isinstance(episode, RaggedEpisodes) else [episode]
        return [(self.predict_episode(part), part.query_labels) for part in parts]

    # -- Lightning hooks shared by all regimes -------------------------------------------------
    def training_step(self, episode: Episode | RaggedEpisodes, batch_idx: int) -> torch.Tensor:
        loss, scores = self.loss_and_scores(episode)
        if self.logs_this_step(batch_idx):
            self.log_dict({"train/loss": loss.detach(),
                           f"train/{self.metric_name}": scores.mean()},
                          batch_size=episode.num_tasks)
        return loss

    def logs_this_step(self, batch_idx: int) -> bool:
        """Whether this training step's metrics reach the loggers; only then are they logged
        (see :mod:`sharebone.callbacks.cadence`). Off the progress bar: Lightning reads a bar
        metric on
        the host at every step, a GPU sync; the bars show what the loggers got instead."""
        return self._trainer is not None and logs_this_step(self._trainer, batch_idx)

    def validation_step(self, episode: Episode | RaggedEpisodes, batch_idx: int) -> None:
        with self.prediction_context():
            loss, scores = self.loss_and_scores(episode)
        self.log_dict({"val/loss": loss.detach(), f"val/{self.metric_name}": scores.mean()},
                      prog_bar=True, batch_size=episode.num_tasks, sync_dist=True)
        sources = getattr(episode, "sources", None)
        for name in dict.fromkeys(sources or ()):  # many sources: each one's score too
            mine = torch.tensor([s == name for s in sources], device=scores.device)
            self.log(f"val/{name}/{self.metric_name}", scores[mine].mean(),
                     batch_size=int(mine.sum()), sync_dist=True)

    # -- optimisation -----------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[Any]:
        """What the optimizer trains: every parameter that requires a gradient (regimes with
        per-group learning rates, e.g. fine-tuning, return groups)."""
        return [p for p in self.parameters() if p.requires_grad]

    def default_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        """Adam at ``hparams.lr`` (and ``weight_decay`` where the regime has one)."""
        return torch.optim.Adam(params, lr=self.hparams.lr,
                                weight_decay=self.hparams.get("weight_decay", 0.0))

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """No schedule unless a regime's paper prescribes one."""
        return None

    def configure_optimizers(self) -> Any:
        params = self.optimizer_param_groups()
        optimizer = (self.optimizer_factory(params) if self.optimizer_factory is not None
                     else self.default_optimizer(params))
        scheduler = (self.scheduler_factory(optimizer) if self.scheduler_factory is not None
                     else self.default_scheduler(optimizer))
        if scheduler is None:
            return optimizer
        # Schedules count optimizer steps (episodes seen), as the meta-learning papers do.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `sharebone.regimes.loading.load_regime` needs to rebuild this model by name, with
        # plain types only so that the file loads with weights_only=True.
        # Callbacks write first (the W&B run's id: sharebone.tracking.WandbRunInCheckpoints).
        checkpoint.setdefault("sharebone", {}).update({
            "regime": self.regime_name,
            "hparams": dict(self.hparams),
            "config": getattr(self, "run_config", None),
        })

