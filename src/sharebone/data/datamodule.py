"""The LightningDataModule that feeds episodes to every regime."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from sharebone.data.episodes import Episode, RaggedEpisodes
from sharebone.data.placement import check_policy, place_source
from sharebone.data.tasks import (
    EpisodeSource,
    EpochOffsetSampler,
    MetaBatches,
    TaskFamily,
    prepare_episode,
)
from sharebone.data.variable import episode_source
from sharebone.errors import check_count


class EpisodeLoader(DataLoader):
    """A DataLoader whose position is saved in checkpoints: exact mid-epoch resume.

    Lightning stores ``state_dict()`` of every training loader that has one (in the fit
    loop's state) and hands it back on resume before iterating; the state is the
    :class:`~sharebone.data.tasks.EpochOffsetSampler`'s next meta-batch, so a resumed run
    continues with the very episode the interrupted one would have drawn next.
    """

    _delivered: int | None = None

    def __iter__(self):
        # Count what was handed to the training loop, not what the sampler gave out: worker
        # processes fetch ahead of the loop.
        self._delivered = None
        for i, batch in enumerate(super().__iter__()):
            self._delivered = getattr(self.sampler, "pass_start", 0) + i + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not hasattr(self.sampler, "state_dict"):
            return {}
        if self._delivered is None:
            return self.sampler.state_dict()
        return {"next_batch": self._delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._delivered = None
        if state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


class EpisodicDataModule(pl.LightningDataModule):
    """Train, validation and test episodes of one task family.

    Training meta-batch ``b`` of epoch ``e`` holds episodes ``(e * n + b) * size ...`` under
    ``seed``; validation and test episodes are fixed by ``eval_seed`` so that every run and
    every regime is scored on the same tasks.

    Args:
        family: the task family (e.g. :class:`~sharebone.data.tasks.OmniglotTasks`).
        train, val: ``{"n_way", "k_shot", "q_query"}`` for the split's episodes, or
            ``{"shape": "meta_dataset"}`` for Meta-Dataset's variable-way, variable-shot
            episodes (:mod:`sharebone.data.variable`; ``shape: fixed`` is N-way K-shot).
        meta_dataset: the rules of ``shape: meta_dataset`` episodes (the paper's if None).
        meta_batch_size: episodes (tasks) per optimizer step.
        batches_per_epoch: training meta-batches per epoch.
        val_episodes: fixed validation episodes, scored after each epoch.
        seed: training episode stream; eval_seed: validation/test episodes.
        images_on_device: ``auto``/``true``/``false``: draw episodes from the split's images
            on the model's GPU (:mod:`sharebone.data.placement`), not from host memory.
    """

    def __init__(self, family: TaskFamily, train: dict[str, int], val: dict[str, int],
                 meta_batch_size: int = 1, batches_per_epoch: int = 100, val_episodes: int = 100,
                 seed: int = 0, eval_seed: int = 0, num_workers: int = 0,
                 images_on_device: str | bool = "auto",
                 meta_dataset: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.meta_dataset = dict(meta_dataset or {})
        self.family = family
        self.train_setting, self.val_setting = dict(train), dict(val)
        self.meta_batch_size = check_count("meta_batch_size", meta_batch_size)
        self.batches_per_epoch = check_count("batches_per_epoch", batches_per_epoch)
        self.val_episodes = check_count("val_episodes", val_episodes)
        self.seed, self.eval_seed = seed, eval_seed
        self.num_workers = check_count("num_workers", num_workers, low=0)
        self.images_on_device = check_policy(images_on_device)
        self._sources: dict[str, EpisodeSource] = {}

    def source(self, split: str) -> EpisodeSource:
        """The ``train`` or ``val`` episode source, built once (an impossible n_way/k_shot
        raises here, with the numbers)."""
        if split not in self._sources:
            setting, seed = ((self.train_setting, self.seed) if split == "train"
                             else (self.val_setting, self.eval_seed))
            self._sources[split] = episode_source(self.family, split, seed, setting,
                                                  self.meta_dataset, key=f"sampler.{split}")
        return self._sources[split]

    def placed_source(self, split: str) -> EpisodeSource:
        """The split's source where its episodes are drawn: moved to the model's GPU once,
        when ``images_on_device`` says so, before the first loader of the split is built."""
        source = self.source(split)
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if device is not None and getattr(source, "device", device) != device:
            source = place_source(source, device, self.images_on_device, self.num_workers)
            self._sources[split] = source
        return source

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Episodes travel as uint8 and become floats on the model's device: augmented and
        # normalised there, one call per meta-batch, by the split's own source.
        if not isinstance(batch, Episode | RaggedEpisodes):
            return batch
        return prepare_episode(self._sources.get(self.stage_split()), batch)

    def stage_split(self) -> str:
        """The split being iterated: ``train`` while training, else ``val``."""
        trainer = self.trainer
        return "train" if trainer is not None and trainer.training else "val"

    def _ddp(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": trainer.global_rank, "world_size": trainer.world_size}

    def _loader(self, dataset: MetaBatches, sampler: Any = None) -> DataLoader:
        # batch_size=None: each dataset item already is a whole meta-batch.
        return EpisodeLoader(dataset, batch_size=None, sampler=sampler,
                             num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        dataset = MetaBatches(self.placed_source("train"), self.meta_batch_size,
                              self.batches_per_epoch, **self._ddp())
        return self._loader(dataset, EpochOffsetSampler(self.batches_per_epoch))

    def val_dataloader(self) -> DataLoader:
        source = self.placed_source("val")
        ddp = self._ddp()
        size = max(self.meta_batch_size, ddp["world_size"])
        size -= size % ddp["world_size"]
        dataset = MetaBatches(source, size, max(1, self.val_episodes // size), **ddp)
        return self._loader(dataset)
