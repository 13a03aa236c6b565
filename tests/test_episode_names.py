"""Figures name classes by their names (a folder's, an Omniglot character's) and say which
source an episode came from (issue 22, item 5)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers.data import make_image_folder

from sharebone.data.datamodule import EpisodicDataModule
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.image_folder import ImageFolderTasks
from sharebone.data.variable import MetaDatasetShape, VariableEpisodeSampler
from sharebone.regimes.protonet import ProtoNet
from sharebone.tracking.dashboard import Dashboard

CLASSES = {name: 5 for name in ("crystal_ball", "goldfish", "hourglass", "tiger_shark",
                                "yawl", "zebra")}


def folder_family(tmp_path) -> ImageFolderTasks:
    root = make_image_folder(tmp_path / "photos", CLASSES)
    names = sorted(CLASSES)
    return ImageFolderTasks(str(root), splits={"train": names[:3], "val": names[3:]},
                            image_size=16, cache_dir=False)


def test_samplers_know_their_class_names(tmp_path):
    family = folder_family(tmp_path)
    sampler = family.sampler("val", 2, 1, 2, seed=0)
    episode = sampler[0]
    names = [sampler.class_name(c) for c in episode.classes.tolist()]
    assert set(names) <= {"tiger_shark", "yawl", "zebra"} and len(set(names)) == 2
    plain = EpisodeSampler(torch.zeros(8, 1, 1, 1), torch.arange(8) // 2, 2, 1, 1)
    assert plain.class_name(3) == "class 3"
    variable = VariableEpisodeSampler(family.sampler("train", 1, 1, 1, seed=0),
                                      MetaDatasetShape(min_ways=2, max_ways=3,
                                                       max_support_set_size=6))
    assert variable.class_name(0) == "crystal_ball"


@pytest.mark.parametrize("val", [{"n_way": 2, "k_shot": 1, "q_query": 2},
                                 {"shape": "meta_dataset"}])
def test_the_validation_figure_names_classes_and_the_source(tmp_path, val):
    family = folder_family(tmp_path)
    setting = {"n_way": 2, "k_shot": 1, "q_query": 2}
    data = EpisodicDataModule(family, setting, val, batches_per_epoch=1, val_episodes=1,
                              meta_dataset={"min_ways": 2, "max_ways": 3,
                                            "max_support_set_size": 6})
    dashboard = Dashboard(tmp_path / "run", [], title="protonet", source="my_photos")
    model = ProtoNet({"name": "conv4", "in_channels": 3, "hidden": 4, "image_size": 16})
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[dashboard],
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    drawn = dashboard.last_drawn
    assert set(drawn["classes"]) <= {"tiger_shark", "yawl", "zebra"}
    assert not any(name.startswith("class ") for name in drawn["classes"])
    assert "validation episode 0 from my_photos" in drawn["title"]
    assert (tmp_path / "run" / "figures" / "val_episode.png").is_file()
