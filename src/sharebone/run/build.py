"""From a composed config to the parts of a run: task family, training data, regime, test
episodes. The one place that reads ``cfg.task``, ``cfg.sampler``, ``cfg.regime`` and
``cfg.test`` together.

Regimes only train. A regime declares what it trains on (``FewShotRegime.trains_on``:
``episodes``, ``tasks``, ``classes`` or ``new_task``); :data:`TRAINING_DATA` makes that data
from the config and says what the regime must be built with to fit it (its heads, its number
of classes). Every setting is checked here, before any training, with the key it came from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sharebone.checkpoint_io import CheckpointError, describe_backbone
from sharebone.data.datamodule import EpisodicDataModule
from sharebone.data.families import build_family
from sharebone.data.multitask import TaskBatchDataModule, TaskSet, class_tasks, held_out_split
from sharebone.errors import SettingError, check_count, user_error
from sharebone.evaluation.fewshot import TestEpisodes, batch_size_for, test_episodes
from sharebone.models.backbones import backbone_differences
from sharebone.models.sharing import MAP_KEYS, SharingMap
from sharebone.regimes import MAML, REGIMES, FewShotRegime
from sharebone.regimes.finetune import source_backbone
from sharebone.regimes.shared import check_heads


@dataclass
class RunParts:
    """What ``sharebone-train`` trains and scores: all built, all settings checked."""

    family: Any
    datamodule: pl.LightningDataModule
    regime: FewShotRegime
    tests: list[TestEpisodes]
    #: Regime arguments taken from the data (``heads``, ``num_classes``).
    from_data: dict[str, Any] = field(default_factory=dict)
    #: The test settings on the val split, where a setting is left to ``auto``
    #: (:mod:`sharebone.evaluation.tuning`); empty otherwise.
    val_tests: list[TestEpisodes] = field(default_factory=list)


@contextmanager
def setting(key: str) -> Iterator[None]:
    """Name the config key in any ``ValueError`` raised while building from it (unless the
    message already names a key below it)."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith((f"{key}.", f"{key.split('.')[0]}.meta_dataset")):
            raise
        raise SettingError(f"{key}: {err}") from err


def regime_class(spec: DictConfig) -> type[FewShotRegime]:
    """The class a ``regime`` config builds: its registered ``name``, else its ``_target_``."""
    name = spec.get("name")
    if name is not None:
        return REGIMES.get(name)
    return get_class(spec._target_)


def build_run(cfg: DictConfig) -> RunParts:
    """Family, training data, regime and test episodes for ``cfg``; raises before training
    on any impossible setting, naming its key."""
    family = build_family(cfg.task.family)
    trains_on = regime_class(cfg.regime).trains_on
    if trains_on not in TRAINING_DATA:
        raise SettingError(f"Regime {cfg.regime.get('name')} trains on {trains_on!r}, which "
                           f"sharebone cannot build (known: {sorted(TRAINING_DATA)}).")
    sharing = sharing_for(cfg)  # refused before any data is decoded
    datamodule, from_data = TRAINING_DATA[trains_on](cfg, family)
    t = cfg.test
    with setting("test"):
        check_count("episodes", t.episodes)
        batch_size_for(t.batch_size, "cpu")  # "auto" or a count
        tests = test_episodes(family, t.settings, q_query=t.q_query, seed=t.seed,
                             prefix="test.", meta_dataset=_plain(meta_dataset_rules(cfg)))
    regime = instantiate(cfg.regime, **from_data, **sharing, _convert_="all")
    regime.optimizer_factory = partial_from(cfg, "optimizer")
    regime.scheduler_factory = partial_from(cfg, "scheduler")
    return RunParts(family, datamodule, regime, tests, from_data,
                    validation_for_auto(cfg, family, regime))


def validation_for_auto(cfg: DictConfig, family: Any, regime: FewShotRegime,
                        ) -> list[TestEpisodes]:
    """The test settings' episodes on the val split when the regime leaves a test-time
    setting to ``auto``; built now, so a family without one is refused before training."""
    auto = regime.auto_settings()
    if not auto:
        return []
    t = cfg.test
    with setting("test"):
        check_count("auto_episodes", t.get("auto_episodes", 100))
    key = next(iter(auto))
    try:
        return test_episodes(family, t.settings, q_query=t.q_query, seed=t.seed, split="val",
                             prefix="test.")
    except SettingError as err:
        raise SettingError(f"{key}=auto chooses on validation episodes of the test settings, "
                           f"which task {cfg.task.name!r} cannot give ({err}). Set {key} to "
                           "a value instead.") from None


def meta_dataset_rules(cfg: DictConfig) -> Any:
    """The run's Meta-Dataset episode rules (``sampler.meta_dataset``), for test settings
    with ``shape: meta_dataset``."""
    return cfg.sampler.get("meta_dataset") if cfg.get("sampler") is not None else None


def sharing_for(cfg: DictConfig) -> dict[str, Any]:
    """The regime's ``sharing`` argument from ``cfg.sharing`` (``{}``: none chosen, the
    regime's own behaviour), checked now: a regime that does not follow a sharing map refuses
    one, and a MAML-family model is built once (random state restored) to resolve its patterns
    against the real parameter names, before any data is decoded."""
    spec = cfg.get("sharing")
    plain = OmegaConf.to_container(spec, resolve=True) if spec is not None else None
    sharing = SharingMap.of(plain)
    if sharing is None:
        return {}
    cls = regime_class(cfg.regime)
    if not getattr(cls, "follows_sharing_map", False):
        key = next((k for k in MAP_KEYS if getattr(sharing, k)), "adapt")
        able = sorted(n for n in REGIMES.names()
                      if getattr(REGIMES.get(n), "follows_sharing_map", False))
        raise SettingError(
            f"sharing.{key}: regime {cfg.regime.get('name')!r} has no way to follow a sharing "
            f"map yet (no per-task adaptation, no per-parameter roles); the regimes that do "
            f"now: {', '.join(able)}. Use sharing=none with this regime, or one of those.")
    try:
        with torch.random.fork_rng(devices=[]):
            regime = instantiate(cfg.regime, sharing=sharing.as_dict(), _convert_="all")
    except InstantiationException as err:
        refused = user_error(err)  # Hydra wraps what the constructor raised
        if refused is None:
            raise
        raise refused from None
    check_shared_head_ways(regime, cfg.test.get("settings") or [])
    return {"sharing": sharing.as_dict()}


def check_shared_head_ways(regime: Any, settings: Any, key: str = "test.settings") -> None:
    """Refuses test settings that a MAML-family head which does not adapt cannot score: met at
    another way count than it was trained for, a learned head starts every way from the same
    mean row (:func:`~sharebone.models.heads.resize_ways`), and with that row shared every
    query scores alike for every way: exactly chance, by construction."""
    roles = getattr(regime, "sharing_roles", None)
    if not isinstance(regime, MAML) or regime.head is None or regime.head.init != "learned" \
            or roles is None or roles.get("head.weight") == "adapt":
        return
    trained = regime.hparams.n_way
    other = sorted({s["n_way"] for s in settings if s.get("n_way") not in (None, trained)})
    if other:
        raise SettingError(
            f"{key}: {other[0]}-way episodes, but the map keeps head.weight "
            f"{roles['head.weight']!r} (it does not adapt) and the head was trained at "
            f"{trained} ways: every one of {other[0]} ways would start from its mean row, so "
            f"every query scores at chance. Fix: test at {trained} ways, add head.* to "
            f"sharing.adapt, or regime.head=zero|proto.")


def partial_from(cfg: DictConfig, key: str) -> Callable[..., Any] | None:
    """``cfg[key]`` (an ``optimizer``/``scheduler`` config) as a callable; None when unset."""
    spec = cfg.get(key)
    if not spec:
        return None
    if not spec.get("_partial_"):
        raise SettingError(f"{key}: set _partial_: true (the regime hands the {key} its "
                           f"{'parameters' if key == 'optimizer' else 'optimizer'}), e.g. "
                           f"configs/{key}/*.yaml.")
    return instantiate(spec)


def check_world_size(datamodule: pl.LightningDataModule, world_size: int) -> None:
    """Under DDP every rank takes an equal share of each meta-batch: checked once the trainer
    knows its world size, before any process is started."""
    size = getattr(datamodule, "meta_batch_size", 1)
    if world_size > 1 and size % world_size:
        raise SettingError(f"sampler.meta_batch_size={size} does not split evenly across "
                           f"{world_size} processes; make it a multiple of {world_size}.")


# -- training data, by what the regime trains on -------------------------------------------


def episodes(cfg: DictConfig, family: Any) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """Meta-batches of few-shot episodes (ProtoNet, the MAML family)."""
    s = cfg.sampler
    with setting("sampler"):
        datamodule = EpisodicDataModule(
            family, train=dict(s.train), val=dict(s.val), meta_batch_size=s.meta_batch_size,
            batches_per_epoch=s.batches_per_epoch, val_episodes=s.val_episodes, seed=s.seed,
            eval_seed=s.eval_seed, num_workers=s.num_workers,
            images_on_device=s.get("images_on_device", "auto"),
            meta_dataset=_plain(s.get("meta_dataset")))
    check_variable_ways(cfg)
    for split in ("train", "val"):
        with setting(f"sampler.{split}"):
            datamodule.source(split)
    check_meta_batch_memory(datamodule, family)
    return datamodule, {}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_variable_ways(cfg: DictConfig) -> None:
    """Variable-way training needs a head sized per episode: a MAML-family model whose head
    is meta-learned for one ``n_way`` is refused before any data is decoded."""
    if cfg.sampler.train.get("shape", "fixed") != "meta_dataset":
        return
    cls = regime_class(cfg.regime)
    if not hasattr(cls, "adapted_shapes"):  # not the MAML family: nothing sized per way
        return
    head = cfg.regime.get("head", "learned")
    step_sizes = cfg.regime.get("learn_step_sizes")
    if step_sizes is None:
        step_sizes = getattr(cls, "preset", {}).get("learn_step_sizes", False)
    if head != "none" and head != "learned" and step_sizes:
        raise SettingError(
            "regime.learn_step_sizes: Meta-SGD learns the head's step sizes for one n_way, "
            "and sampler.train.shape=meta_dataset draws a different number of ways per "
            "episode. Fix: regime.learn_step_sizes=false, or sampler.train.shape=fixed.")
    if head == "learned":
        raise SettingError(
            "regime.head=learned: sampler.train.shape=meta_dataset draws a different number "
            "of ways per episode, and a meta-learned head has rows for one n_way. Fix: "
            "regime.head=zero (a zero head sized per episode, Triantafillou et al.'s "
            "zero-init) or regime.head=proto (Proto-MAML).")


def _per_task_images(setting_: Any, meta_dataset: Any) -> int:
    if setting_.get("shape", "fixed") == "meta_dataset":
        from sharebone.data.variable import MetaDatasetShape

        rules = MetaDatasetShape.of({**dict(meta_dataset or {}),
                                     **dict(setting_.get("meta_dataset") or {})})
        return rules.max_support_set_size + rules.max_ways * rules.max_query_per_class
    return int(setting_["n_way"]) * (int(setting_["k_shot"]) + int(setting_["q_query"]))


def check_meta_batch_memory(datamodule: EpisodicDataModule, family: Any,
                            available: int | None = None) -> None:
    """Refuse a meta-batch whose float inputs alone exceed the machine's memory: it would
    fail deep inside an allocation after minutes, or take the machine down with it
    (Meta-Dataset-shaped episodes at their largest)."""
    setting_ = datamodule.train_setting
    per_task = (_per_task_images(setting_, getattr(datamodule, "meta_dataset", None))
                * math.prod(getattr(family, "input_shape", (1,))))
    needed = 4 * per_task * datamodule.meta_batch_size
    available = available if available is not None else physical_memory()
    if available and needed > available:
        raise SettingError(
            f"sampler.meta_batch_size={datamodule.meta_batch_size}: one meta-batch of "
            f"{_describe(setting_)} episodes is {needed / 2**30:.1f} GiB of float32 inputs "
            f"alone, more than this machine's {available / 2**30:.1f} GiB. Lower "
            "sampler.meta_batch_size (and raise trainer.accumulate_grad_batches for the same "
            "meta-gradient).")


def _describe(setting_: Any) -> str:
    if setting_.get("shape", "fixed") == "meta_dataset":
        return "Meta-Dataset-shaped (at their largest)"
    return f"{setting_['n_way']}-way {setting_['k_shot']}-shot {setting_['q_query']}-query"


def physical_memory() -> int:
    """Bytes of RAM (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _task_batches(cfg: DictConfig, family: Any, data: TaskSet,
                  val_data: TaskSet | None = None) -> TaskBatchDataModule:
    s = cfg.sampler
    with setting("sampler"):
        datamodule = TaskBatchDataModule(
            family, data, per_task=check_count("regime.batch_size", cfg.regime.batch_size),
            val=dict(s.val), batches_per_epoch=s.batches_per_epoch, val_episodes=s.val_episodes,
            seed=s.seed, eval_seed=s.eval_seed, num_workers=s.num_workers, val_data=val_data,
            meta_dataset=_plain(s.get("meta_dataset")))
    if val_data is None:
        with setting("sampler.val"):
            datamodule.source("val")
    return datamodule


def tasks(cfg: DictConfig, family: Any) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """The family's training tasks, task-balanced batches, one head per task (multitask)."""
    if not hasattr(family, "tasks"):
        raise SettingError(
            f"Task family {type(family).__name__} does not split its training data into "
            "tasks (no .tasks()); multitask needs one that does, e.g. task=omniglot_alphabets "
            "or task=synthetic_regression. To train one head on all classes use "
            "regime=pretrain.")
    data = family.tasks("train")
    heads = cfg.regime.get("heads")
    if heads is not None:
        check_heads(dict(heads), data.heads)
    return _task_batches(cfg, family, data), {"heads": dict(heads or data.heads)}


def classes(cfg: DictConfig, family: Any) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """Every training class as one task: a classifier over all of them (pre-training)."""
    data = class_tasks(family, "train", name="classes")
    n = _num_classes(cfg, data.outputs[0], "the training split")
    return _task_batches(cfg, family, data), {"num_classes": n}


def new_task(cfg: DictConfig, family: Any) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """A split's classes as a new task: ``train_per_class`` images each to train on, the rest
    to validate on (fine-tuning). The source checkpoint is checked before any data is read."""
    r = cfg.regime
    if r.get("source"):
        spec, _ = source_backbone(r.source)
        if r.get("backbone") is not None and backbone_differences(dict(r.backbone), spec):
            raise CheckpointError(
                f"{r.source} has backbone ({describe_backbone(spec)}) but "
                f"({describe_backbone(dict(r.backbone))}) is configured; pass the same "
                "backbone=..., or regime.backbone=null to take the checkpoint's.")
    data = class_tasks(family, r.target_split, name="target")
    train, held = held_out_split(data, check_count("regime.train_per_class",
                                                   r.train_per_class))
    n = _num_classes(cfg, data.outputs[0], f"split '{r.target_split}'")
    return _task_batches(cfg, family, train, val_data=held), {"num_classes": n}


def _num_classes(cfg: DictConfig, found: int, where: str) -> int:
    configured = cfg.regime.get("num_classes")
    if configured is not None and int(configured) != found:
        raise SettingError(f"regime.num_classes={configured} but {where} has {found} classes; "
                           "set regime.num_classes=null to take it from the data.")
    return found


#: ``FewShotRegime.trains_on`` -> the function that builds that training data.
TRAINING_DATA: dict[str, Callable[[DictConfig, Any], tuple[pl.LightningDataModule,
                                                           dict[str, Any]]]] = {
    "episodes": episodes, "tasks": tasks, "classes": classes, "new_task": new_task}


def resolved(cfg: DictConfig, from_data: dict[str, Any]) -> dict[str, Any]:
    """The run's config as plain values, with what was taken from the data filled in (so the
    logged and saved config says which heads the model has)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["regime"].update(from_data)
    return plain
