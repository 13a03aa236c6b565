"""Small real training for tests: a random-image task family and a few Lightning steps."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from sharebone.data.datamodule import EpisodicDataModule
from sharebone.data.episodes import EpisodeSampler


class RandomImages:
    """A task family of random uint8 16x16 images, 12 classes x 6 per split."""

    input_shape = (1, 16, 16)

    def sampler(self, split, n_way, k_shot, q_query, seed):
        g = torch.Generator().manual_seed(len(split))
        images = torch.randint(0, 256, (72, 1, 16, 16), generator=g, dtype=torch.uint8)
        return EpisodeSampler(images, torch.arange(72) // 6, n_way, k_shot, q_query, seed=seed,
                              split=split)


def fit(model, tmp_path, max_steps=2, family=None, setting=None):
    family = family or RandomImages()
    setting = setting or {"n_way": 3, "k_shot": 1, "q_query": 2}
    data = EpisodicDataModule(family, setting, setting, meta_batch_size=2, batches_per_epoch=2,
                              val_episodes=2)
    trainer = pl.Trainer(max_steps=max_steps, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, accelerator="cpu",
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return trainer, path
