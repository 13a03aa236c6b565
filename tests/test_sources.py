"""Many sources in one run (issue 22, item 2): the per-episode source choice, each source's
images converted to the backbone's input, per-source validation and test rows, refusals."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.data.episodes import RaggedEpisodes
from sharebone.data.sources import MultiSourceTasks
from sharebone.data.variable import episode_source
from sharebone.errors import SettingError


def synthetic(channels: int, size: int, seed: int) -> dict:
    return {"name": "synthetic_images", "classes": {"train": 10, "val": 8}, "seed": seed,
            "images_per_class": 12, "image_size": size, "channels": channels}


def two_sources(weights=None) -> MultiSourceTasks:
    return MultiSourceTasks([
        {"name": "grey", "channels": 1, "image_size": 16, "family": synthetic(1, 16, 0)},
        {"name": "rgb", "channels": 3, "image_size": 32, "family": synthetic(3, 32, 1)},
    ], channels=1, image_size=16, weights=weights)


def test_each_episode_has_one_source_by_the_hash():
    sampler = two_sources().sampler("train", 3, 1, 2, seed=4)
    batch = sampler.batch(range(400))
    assert batch.support.shape[-3:] == (1, 16, 16), "every source as the backbone's input"
    share = batch.sources.count("rgb") / len(batch.sources)
    assert 0.4 < share < 0.6, "uniform by default"
    first = dict(zip(batch.index.tolist(), batch.sources, strict=True))
    again = sampler.batch([7, 3, 399])
    assert list(again.sources) == sorted([first[7], first[3], first[399]],
                                         key=["grey", "rgb"].index)
    for t, i in enumerate(again.index.tolist()):  # episode i is its source's episode i
        own = sampler.named(again.sources[t])[i]
        assert torch.equal(own.support, again.support[t])
    weighted = two_sources(weights=[3, 1]).sampler("train", 3, 1, 2, seed=4).batch(range(400))
    assert 0.15 < weighted.sources.count("rgb") / 400 < 0.35
    only = two_sources(weights=[1, 0]).sampler("train", 3, 1, 2, seed=4).batch(range(50))
    assert set(only.sources) == {"grey"}


def test_variable_shapes_mix_sources_too():
    source = episode_source(two_sources(), "train", 0, {"shape": "meta_dataset"},
                            {"max_ways": 6, "max_support_set_size": 20})
    batch = source.batch(range(12))
    assert isinstance(batch, RaggedEpisodes) and set(batch.sources) == {"grey", "rgb"}
    assert batch.support.shape[1:] == (1, 16, 16)
    assert [t.sources for t in batch.tasks()] == [(n,) for n in batch.sources]


@pytest.mark.parametrize(("change", "key"), [
    ({"weights": [1, 2, 3]}, r"^task\.family\.weights has 3 entries for 2 sources"),
    ({"weights": [0, 0]}, r"^task\.family\.weights must be numbers"),
    ({"channels": 4}, r"^task\.family\.sources\[0\]\.channels=1: .* 4 channels"),
])
def test_bad_sources_are_refused_before_any_data(change, key):
    sources = [{"name": "grey", "channels": 1, "image_size": 16, "family": synthetic(1, 16, 0)},
               {"name": "rgb", "channels": 3, "image_size": 32, "family": synthetic(3, 32, 1)}]
    kwargs = {"channels": 1, "image_size": 16, **change}
    with pytest.raises(SettingError, match=key):
        MultiSourceTasks(sources, **kwargs)


def test_a_source_with_too_few_classes_is_named():
    family = two_sources()
    with pytest.raises(SettingError, match=r"^task\.family\.sources\[0\] \(grey\): 9-way"):
        family.sampler("val", 9, 1, 1, seed=0)


def test_a_run_of_many_sources_validates_and_tests_each(tmp_path):
    from sharebone.run.train import run

    metrics = run(compose_train(tmp_path, FAST + [
        "task=multi_source", "logger=csv", "backbone.hidden=8", "sampler.batches_per_epoch=2",
        "sampler.val_episodes=8", "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]"]))
    for name in ("synthetic_grey28", "synthetic_rgb84", "average"):
        assert 0.0 <= metrics[f"test/{name}/5w1s/acc"] <= 1.0
    with open(tmp_path / "csv" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"val/synthetic_grey28/acc", "val/synthetic_rgb84/acc"} <= set(header)
