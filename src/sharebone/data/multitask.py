"""Task families for multitask learning and pre-training: plain ``(input, target, task)`` batches.

Episodic regimes see a stream of few-shot episodes; multitask and pre-training regimes instead
train on fixed tasks, each with its own head. A :class:`TaskSet` holds the examples of those
tasks, :class:`TaskBatches` cuts addressable, task-balanced batches out of it (batch ``b`` is a
pure function of ``(seed, b)``, like episodes), and :class:`TaskBatchDataModule` feeds them to
Lightning, keeping few-shot validation episodes so every regime is validated alike.

Families:

- :class:`OmniglotAlphabets`: each alphabet of a split is its own classification task
  (``tasks/omniglot_alphabets.yaml``);
- :class:`SyntheticRegressionTasks`: regression tasks whose shared structure is set by a
  ``relatedness`` knob, for studying transfer and gradient conflict
  (``tasks/synthetic_regression.yaml``);
- :func:`class_tasks`: any image family's split as one task over all its classes (the
  Baseline/RFS pre-training task).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from sharebone.data.datamodule import EpisodicDataModule
from sharebone.data.episodes import Episode, RaggedEpisodes, split_id
from sharebone.data.families import register_family
from sharebone.data.tasks import EpochOffsetSampler, OmniglotTasks, SyntheticImageTasks, TaskFamily
from sharebone.errors import SettingError, UnknownNameError, check_count

__all__ = ["OmniglotAlphabets", "SyntheticImageGroups", "SyntheticRegressionTasks",
           "TaskBatchDataModule",
           "TaskBatches", "TaskSet", "class_tasks", "held_out_split"]


@dataclass(frozen=True)
class TaskSet:
    """Examples of ``len(names)`` tasks, sorted by task.

    Attributes:
        inputs: ``[N, ...]`` (uint8 images, or float features).
        targets: ``[N]``: int64 class within the example's task (``0 .. outputs[t]-1``), or
            float regression targets, one per example (a head's ``[N, 1]`` outputs are scored
            against them as :mod:`sharebone.task_kind` says).
        task: ``[N]`` int64 index into ``names``, non-decreasing.
        names: task names, e.g. alphabets.
        outputs: per task, the head's output size (classes; 1 for regression).

    Example:
        >>> s = TaskSet(torch.zeros(6, 2), torch.tensor([0, 1, 0, 0, 1, 2]),
        ...             torch.tensor([0, 0, 1, 1, 1, 1]), ["a", "b"], [2, 3])
        >>> s.heads, s.counts.tolist()
        ({'a': 2, 'b': 3}, [2, 4])
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    task: torch.Tensor
    names: list[str]
    outputs: list[int]

    def __post_init__(self) -> None:
        n = self.inputs.shape[0]
        if self.targets.shape[0] != n or self.task.shape[0] != n:
            raise SettingError(f"{n} inputs but {self.targets.shape[0]} targets and "
                               f"{self.task.shape[0]} task ids.")
        if len(self.names) != len(self.outputs) or len(set(self.names)) != len(self.names):
            raise SettingError(f"Task names must be unique, one per output size: {self.names}, "
                               f"{self.outputs}.")
        if n and bool((self.task[1:] < self.task[:-1]).any()):
            raise SettingError("Examples must be sorted by task.")
        empty = [name for name, c in zip(self.names, self.counts.tolist(), strict=True) if c == 0]
        if empty:
            raise SettingError(f"Task(s) {empty} have no examples.")

    @property
    def heads(self) -> dict[str, int]:
        """Task name -> head output size: what a multitask regime's ``heads`` should be."""
        return dict(zip(self.names, self.outputs, strict=True))

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self.task, minlength=len(self.names))

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(self.counts, 0) - self.counts

    def subset(self, names: Sequence[str]) -> TaskSet:
        """Only the tasks ``names`` (in that order), e.g. one task for a single-task baseline."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise UnknownNameError(f"Unknown task(s) {unknown}; this set has {self.names}.")
        parts, new_task = [], []
        for i, name in enumerate(names):
            t = self.names.index(name)
            rows = torch.nonzero(self.task == t).flatten()
            parts.append(rows)
            new_task.append(torch.full((rows.numel(),), i, dtype=torch.int64))
        rows = torch.cat(parts)
        return TaskSet(self.inputs[rows], self.targets[rows], torch.cat(new_task), list(names),
                       [self.outputs[self.names.index(n)] for n in names])


def _task_set(inputs: torch.Tensor, targets: torch.Tensor, groups: Sequence[str]) -> TaskSet:
    """A TaskSet from per-class data where class ``c`` belongs to task ``groups[c]``;
    classes are renumbered within their task in order of appearance."""
    names = list(dict.fromkeys(groups))
    task_of_class = torch.tensor([names.index(g) for g in groups], dtype=torch.int64)
    local = torch.zeros(len(groups), dtype=torch.int64)
    outputs = [0] * len(names)
    for c, g in enumerate(groups):
        t = names.index(g)
        local[c] = outputs[t]
        outputs[t] += 1
    task = task_of_class[targets]
    key = task * len(groups) + targets
    if key.numel() and not bool((key[1:] < key[:-1]).any()):
        # Already in order (one task over a cache sorted by class): the images themselves, not
        # a copy; a memory-mapped cache stays on disk.
        return TaskSet(inputs, local[targets], task, names, outputs)
    order = torch.argsort(key, stable=True)
    return TaskSet(inputs[order], local[targets[order]], task[order], names, outputs)


def class_tasks(family: TaskFamily, split: str = "train", name: str = "classes") -> TaskSet:
    """A split of any image family as a single task over all of its classes (pre-training)."""
    data = family.images(split)  # an ImageSet, or (images, labels) for generated families
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    n_classes = int(labels.max()) + 1
    return _task_set(images, labels, [name] * n_classes)


def held_out_split(data: TaskSet, train_per_class: int) -> tuple[TaskSet, TaskSet]:
    """The first ``train_per_class`` examples of every (task, class) for training, the rest held
    out: a new task's training and evaluation data (fine-tuning)."""
    key = data.task * (int(data.targets.max()) + 1) + data.targets
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    if int(counts.min()) <= train_per_class:
        raise SettingError(f"train_per_class={train_per_class} leaves no held-out example: the "
                           f"smallest class has {int(counts.min())} examples.")
    rank = torch.zeros_like(key)
    seen: dict[int, int] = {}
    for i, k in enumerate(inverse.tolist()):
        rank[i] = seen.get(k, 0)
        seen[k] = rank[i].item() + 1
    train = rank < train_per_class

    def pick(mask: torch.Tensor) -> TaskSet:
        return TaskSet(data.inputs[mask], data.targets[mask], data.task[mask], data.names,
                       data.outputs)

    return pick(train), pick(~train)


@register_family("omniglot_alphabets")
class OmniglotAlphabets(OmniglotTasks):
    """Omniglot with each alphabet of a split as its own classification task.

    Episodes (validation, few-shot test) are those of :class:`OmniglotTasks` with the same
    splits; :meth:`tasks` groups a split's classes by alphabet (a rotated character stays in its
    alphabet's task, as its own class).

    Example:
        >>> family = OmniglotAlphabets({"train": {"archives": ["images_background_small1"]}})
        >>> family.input_shape
        (1, 28, 28)
    """

    def tasks(self, split: str = "train") -> TaskSet:
        data = self.images(split)
        alphabets = [name.split("/", 1)[0] for name in data.class_names]
        return _task_set(data.images, data.labels, alphabets)


@register_family("synthetic_image_groups")
class SyntheticImageGroups(SyntheticImageTasks):
    """Generated image classes (:class:`~sharebone.data.tasks.SyntheticImageTasks`, same
    images and episodes) dealt round-robin into ``num_tasks`` classification tasks: the
    download-free stand-in for :class:`OmniglotAlphabets` in smoke runs and tests.

    Example:
        >>> SyntheticImageGroups({"train": 10}, num_tasks=3).tasks("train").heads
        {'group0': 4, 'group1': 3, 'group2': 3}
    """

    def __init__(self, classes: dict[str, int], num_tasks: int = 4, **kwargs: Any) -> None:
        super().__init__(classes, **kwargs)
        self.num_tasks = num_tasks

    def tasks(self, split: str = "train") -> TaskSet:
        images, labels = self.images(split)
        n = int(labels.max()) + 1
        return _task_set(images, labels, [f"group{c % self.num_tasks}" for c in range(n)])


def _regression_weights(generator: torch.Generator, shared: torch.Tensor, tasks: int,
                        relatedness: float) -> tuple[torch.Tensor, torch.Tensor]:
    latent, dim = shared.shape
    private = torch.randn(tasks, latent, dim, generator=generator) / math.sqrt(dim)
    mix = relatedness * shared + math.sqrt(max(0.0, 1.0 - relatedness**2)) * private
    readout = torch.randn(tasks, latent, generator=generator)
    return mix, readout


@register_family("synthetic_regression")
class SyntheticRegressionTasks:
    """Regression tasks that share a latent subspace to a set degree.

    Task ``t`` maps ``x ~ N(0, I_d)`` to ``y = a_t . tanh(B_t x) + noise``, with
    ``B_t = r B_0 + sqrt(1 - r^2) P_t`` (``B_0`` shared, ``P_t`` private, both ``k x d``) and
    ``r = relatedness``. At ``r = 1`` every task reads the same ``k`` features, so a shared
    backbone with one linear head per task is exactly right and tasks help each other; as
    ``r -> 0`` the tasks need different features, compete for the backbone's capacity and
    their gradients on it conflict. (Caruana 1997 and Baxter 2000 frame multitask gains this
    way; the construction follows the shared-subspace models of Maurer et al., JMLR 2016.)

    ``tasks(split)`` gives the fixed training tasks (``train``: ``samples_per_task`` examples
    each; ``val``/``test``: held-out examples of the same tasks). ``sampler(...)`` gives
    few-shot regression episodes of *new* tasks from the same process (``n_way * k_shot``
    support and ``n_way * q_query`` query points each), to score a backbone with a fresh head.

    Example:
        >>> family = SyntheticRegressionTasks(num_tasks=3, input_dim=5, relatedness=0.5)
        >>> s = family.tasks("train")
        >>> s.inputs.shape, s.names, s.outputs
        (torch.Size([96, 5]), ['task0', 'task1', 'task2'], [1, 1, 1])
        >>> episode = family.sampler("test", 1, 4, 8, seed=0).batch([0, 1])
        >>> episode.query.shape, episode.query_labels.shape
        (torch.Size([2, 8, 5]), torch.Size([2, 8, 1]))
    """

    def __init__(self, num_tasks: int = 6, input_dim: int = 16, latent_dim: int = 4,
                 relatedness: float = 1.0, samples_per_task: int = 32,
                 eval_samples_per_task: int = 256, noise: float = 0.1, seed: int = 0) -> None:
        if not 0.0 <= relatedness <= 1.0:
            raise SettingError(f"relatedness must be in [0, 1], got {relatedness}.")
        self.num_tasks, self.input_dim, self.latent_dim = num_tasks, input_dim, latent_dim
        self.relatedness, self.noise, self.seed = float(relatedness), float(noise), seed
        self.samples = {"train": samples_per_task, "val": eval_samples_per_task,
                        "test": eval_samples_per_task}
        self.input_shape = (input_dim,)
        g = torch.Generator().manual_seed(seed)
        self.shared = torch.randn(latent_dim, input_dim, generator=g) / math.sqrt(input_dim)
        self.mix, self.readout = _regression_weights(g, self.shared, num_tasks, self.relatedness)

    def _targets(self, x: torch.Tensor, mix: torch.Tensor, readout: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        clean = (torch.tanh(x @ mix.transpose(-1, -2)) * readout.unsqueeze(-2)).sum(-1)
        return clean + self.noise * torch.randn(clean.shape, generator=generator)

    def tasks(self, split: str = "train") -> TaskSet:
        if split not in self.samples:
            raise UnknownNameError(f"Unknown split '{split}'. This family has: "
                                   f"{sorted(self.samples)}.")
        g = torch.Generator().manual_seed(self.seed * 7919 + 1 + sorted(self.samples).index(split))
        n = self.samples[split]
        x = torch.randn(self.num_tasks, n, self.input_dim, generator=g)
        y = self._targets(x, self.mix, self.readout, g)
        task = torch.arange(self.num_tasks).repeat_interleave(n)
        return TaskSet(x.flatten(0, 1), y.flatten(), task,
                       [f"task{t}" for t in range(self.num_tasks)], [1] * self.num_tasks)

    def sampler(self, split: str, n_way: int, k_shot: int, q_query: int,
                seed: int) -> _RegressionEpisodes:
        if split not in self.samples:
            raise UnknownNameError(f"Unknown split '{split}'. This family has: "
                                   f"{sorted(self.samples)}.")
        n_way = check_count("n_way", n_way)
        return _RegressionEpisodes(self, split, n_way * check_count("k_shot", k_shot),
                                   n_way * check_count("q_query", q_query), seed)


class _RegressionEpisodes:
    """Episode ``i``: a new task drawn from the family's process, a pure function of
    ``(seed, split, i)``. Inputs ``[T, M, input_dim]``, targets ``[T, M, 1]`` (the
    :class:`~sharebone.data.episodes.Episode` convention for regression); ``classes`` is
    ``[T, 1]`` zeros (one output)."""

    def __init__(self, family: SyntheticRegressionTasks, split: str, support: int, query: int,
                 seed: int) -> None:
        self.family, self.split, self.support, self.query, self.seed = (family, split, support,
                                                                        query, seed)

    def batch(self, indices: Any) -> Episode:
        f = self.family
        xs, ys = [], []
        for i in torch.as_tensor(indices).reshape(-1).tolist():
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + split_id(self.split) * 7919 + i) % (2**63))
            mix, readout = _regression_weights(g, f.shared, 1, f.relatedness)
            x = torch.randn(self.support + self.query, f.input_dim, generator=g)
            xs.append(x)
            ys.append(f._targets(x, mix[0], readout[0], g))
        x, y = torch.stack(xs), torch.stack(ys).unsqueeze(-1)
        s = self.support
        return Episode(support=x[:, :s], support_labels=y[:, :s], query=x[:, s:],
                       query_labels=y[:, s:], classes=torch.zeros(len(xs), 1, dtype=torch.int64))


class TaskBatches(torch.utils.data.Dataset):
    """Item ``b`` is a task-balanced batch: ``per_task`` examples of every task, drawn without
    replacement within the batch, a pure function of ``(seed, b)``.

    Returns ``(inputs [T * per_task, ...], targets [T * per_task], task [T * per_task])``,
    and with ``with_index`` also ``b`` (a 0-d int64 tensor: it seeds the batch's augmentation,
    which the data module applies on the device and then drops).
    """

    def __init__(self, data: TaskSet, per_task: int, length: int, seed: int = 0,
                 with_index: bool = False) -> None:
        if per_task < 1:
            raise SettingError(f"per_task must be >= 1, got {per_task}.")
        self.data, self.per_task, self.length, self.seed = data, per_task, length, seed
        self.with_index = with_index

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(b)) % (2**63))
        rows = []
        d = self.data
        for offset, count in zip(d.offsets.tolist(), d.counts.tolist(), strict=True):
            if count >= self.per_task:
                pick = torch.randperm(count, generator=g)[: self.per_task]
            else:
                pick = torch.randint(count, (self.per_task,), generator=g)
            rows.append(offset + pick)
        rows = torch.cat(rows)
        batch = (d.inputs.index_select(0, rows), d.targets[rows], d.task[rows])
        return (*batch, torch.tensor(int(b))) if self.with_index else batch


def _to_float(batch: Any) -> Any:
    if isinstance(batch, Episode | RaggedEpisodes):
        return batch.to_float()
    if isinstance(batch, (tuple, list)) and batch and batch[0].dtype == torch.uint8:
        return (batch[0].float().div_(255), *batch[1:])
    return batch


class TaskBatchDataModule(EpisodicDataModule):
    """Plain task-balanced training batches from a :class:`TaskSet`; validation as the
    episodic datamodule does it (fixed few-shot episodes of the ``val`` split), or, when
    ``val_data`` is given, plain batches of held-out examples (fine-tuning on a new task).

    Args:
        family: the task family (for validation episodes).
        data: the training tasks.
        per_task: examples of each task per batch.
        val: ``{"n_way", "k_shot", "q_query"}`` of the validation episodes.
        val_data: held-out examples to validate on instead of episodes.
        Others as :class:`~sharebone.data.datamodule.EpisodicDataModule`.
    """

    def __init__(self, family: TaskFamily, data: TaskSet, per_task: int, val: dict[str, int],
                 batches_per_epoch: int = 100, val_episodes: int = 100, seed: int = 0,
                 eval_seed: int = 0, num_workers: int = 0, val_data: TaskSet | None = None,
                 val_batch_size: int = 256, meta_dataset: dict[str, Any] | None = None) -> None:
        super().__init__(family, train={}, val=val, meta_batch_size=1,
                         batches_per_epoch=batches_per_epoch, val_episodes=val_episodes,
                         seed=seed, eval_seed=eval_seed, num_workers=num_workers,
                         meta_dataset=meta_dataset)
        self.data, self.per_task = data, per_task
        self.val_data, self.val_batch_size = val_data, val_batch_size

    @property
    def task_names(self) -> list[str]:
        return list(self.data.names)

    def input_transform(self, split: str) -> Any:
        """The family's transform of ``split``'s images (augmentation, normalisation), or None
        for a family without one."""
        make = getattr(self.family, "input_transform", None)
        if make is None:
            return None
        return make(split, self.seed if split == "train" else self.eval_seed)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Episode | RaggedEpisodes):
            return super().on_after_batch_transfer(batch, dataloader_idx)
        if not (isinstance(batch, tuple | list) and batch and batch[0].dtype == torch.uint8):
            return _to_float(batch)
        inputs, targets, task, *index = batch
        transform = self.input_transform(self.stage_split())
        if transform is None:
            return _to_float((inputs, targets, task))
        index = index[0].reshape(1).cpu() if index else None
        return (transform.images(inputs.unsqueeze(0), index)[0], targets, task)

    def train_dataloader(self) -> DataLoader:
        dataset = TaskBatches(self.data, self.per_task, self.batches_per_epoch, self.seed,
                              with_index=self.input_transform("train") is not None)
        return self._loader(dataset, EpochOffsetSampler(self.batches_per_epoch))

    def val_dataloader(self) -> DataLoader:
        if self.val_data is None:
            return super().val_dataloader()
        d = self.val_data
        dataset = torch.utils.data.TensorDataset(d.inputs, d.targets, d.task)
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False)
