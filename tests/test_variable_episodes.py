"""Meta-Dataset-shaped episodes: the paper's rules, addressability, ragged meta-batches, every
regime training and scored on them, clear refusals."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.configs import FAST, compose_train

from sharebone.data.episodes import EpisodeSampler, RaggedEpisodes, hash_keys, uniform
from sharebone.data.tasks import MetaBatches, SyntheticImageTasks
from sharebone.data.variable import (
    WAYS_STREAM,
    WEIGHT_STREAM,
    MetaDatasetShape,
    VariableEpisodeSampler,
    episode_source,
)
from sharebone.errors import SettingError


def uneven_data(n_classes: int = 60, seed: int = 0):
    """Classes of 4..120 images; an image's value is its row, so picks can be traced."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 121, (n_classes,), generator=g)
    labels = torch.arange(n_classes).repeat_interleave(sizes)
    images = torch.arange(labels.numel()).view(-1, 1, 1, 1)
    return images, labels, sizes


def sampler_for(shape: MetaDatasetShape | None = None, seed: int = 3, split: str = "train",
                n_classes: int = 60) -> tuple[VariableEpisodeSampler, torch.Tensor, torch.Tensor]:
    images, labels, sizes = uneven_data(n_classes)
    base = EpisodeSampler(images, labels, 1, 1, 1, seed=seed, split=split)
    return VariableEpisodeSampler(base, shape or MetaDatasetShape()), labels, sizes


def reference_shape(shape: MetaDatasetShape, sizes: torch.Tensor, seed: int, split: str,
                    i: int) -> tuple[list[int], list[int], int]:
    """Episode ``i``'s (classes, shots, queries) by the paper's formulas, written out one
    scalar at a time from the same hashed draws (meta_dataset/data/sampling.py)."""
    index = torch.tensor([i])
    u = uniform(seed, split, index, WAYS_STREAM, (2,))[0].tolist()
    hi = min(shape.max_ways, len(sizes))
    ways = min(hi, shape.min_ways + int(u[0] * (hi - shape.min_ways + 1)))
    keys = hash_keys(seed, split, index, 0, (len(sizes),))[0].tolist()
    classes = sorted(range(len(sizes)), key=keys.__getitem__)[:ways]
    counts = [int(sizes[c]) for c in classes]
    q = min(shape.max_query_per_class, min(counts) // 2)
    left = [n - q for n in counts]
    support = min(shape.max_support_set_size,
                  sum(math.floor(u[1] * min(shape.max_support_per_class, n) + 1) for n in left))
    noise = uniform(seed, split, index, WEIGHT_STREAM, (hi,))[0].tolist()
    span = shape.max_log_weight - shape.min_log_weight
    weights = [n * math.exp(shape.min_log_weight + noise[j] * span)
               for j, n in enumerate(counts)]
    shots = [min(math.floor(w / sum(weights) * (support - ways)) + 1, n)
             for w, n in zip(weights, left, strict=True)]
    return classes, shots, q


def test_episodes_follow_the_papers_rules():
    shape = MetaDatasetShape()
    sampler, labels, sizes = sampler_for(shape)
    batch = sampler.batch(range(40))
    for i, episode in enumerate(batch.tasks()):
        classes, shots, q = reference_shape(shape, sizes, 3, "train", i)
        assert episode.classes[0].tolist() == classes
        assert episode.support_labels[0].bincount().tolist() == shots
        assert episode.query_labels[0].bincount().tolist() == [q] * len(classes)
        assert 5 <= len(classes) <= 50 and sum(shots) <= 500 and min(shots) >= 1


def test_every_episode_is_valid_and_shapes_vary():
    sampler, labels, _ = sampler_for()
    batch = sampler.batch(range(60))
    ways, totals = set(), set()
    for episode in batch.tasks():
        rows = torch.cat([episode.support[0], episode.query[0]]).flatten()
        assert rows.unique().numel() == rows.numel(), "no image twice in one episode"
        assert len(set(episode.classes[0].tolist())) == episode.n_way
        for images, way in ((episode.support[0], episode.support_labels[0]),
                            (episode.query[0], episode.query_labels[0])):
            assert torch.equal(labels[images.flatten()], episode.classes[0][way])
        ways.add(episode.n_way)
        totals.add(episode.support.shape[1])
    assert len(ways) > 10 and len(totals) > 10, "ways and support sizes vary by episode"
    shots = batch.tasks()[0].support_labels[0].bincount()
    assert shots.min() < shots.max(), "class imbalance: shots differ within an episode"


def test_episode_i_is_a_pure_function_of_seed_split_index():
    a, _, _ = sampler_for(seed=5)
    b, _, _ = sampler_for(seed=5)
    batch = a.batch([9, 3, 100])
    assert torch.equal(b[3].support, batch.tasks()[1].support[0])
    assert torch.equal(b.batch([100, 9]).tasks()[1].query, batch.tasks()[0].query)
    assert torch.equal(b[100].support_labels, batch.task(2).support_labels)
    other_seed = sampler_for(seed=6)[0].batch(range(20))
    other_split = sampler_for(seed=5, split="val")[0].batch(range(20))
    same = a.batch(range(20))
    assert not torch.equal(same.ways, other_seed.ways)
    assert not torch.equal(same.ways, other_split.ways)


def test_ddp_shares_hold_the_same_episodes_as_one_process():
    sampler, _, _ = sampler_for()
    whole = MetaBatches(sampler, 4, 3)[2]
    shares = [MetaBatches(sampler, 4, 3, rank=r, world_size=2)[2] for r in range(2)]
    joined = [t for share in shares for t in share.tasks()]
    for mine, theirs in zip(whole.tasks(), joined, strict=True):
        assert torch.equal(mine.support, theirs.support)
        assert torch.equal(mine.query_labels, theirs.query_labels)


def test_a_ragged_meta_batch_is_exactly_its_tasks_bytes():
    images, labels, _ = uneven_data()
    base = EpisodeSampler((images % 256).to(torch.uint8), labels, 1, 1, 1)
    batch = VariableEpisodeSampler(base, MetaDatasetShape()).batch(range(8))
    assert batch.support.shape[0] == int(batch.support_sizes.sum())
    assert batch.query.shape[0] == int(batch.query_sizes.sum())
    floats = batch.to_float()
    assert floats.support.dtype == torch.float32
    assert torch.equal(floats.tasks()[3].support, batch.tasks()[3].support.float() / 255)
    doubled = batch.map(lambda e: e.to_float())
    assert torch.equal(doubled.query, floats.query)


@pytest.mark.parametrize(("spec", "key"), [
    ({"max_support_set_size": 20, "max_ways": 40}, "sampler.meta_dataset.max_support_set_size"),
    ({"min_ways": 8, "max_ways": 6}, "sampler.meta_dataset.max_ways"),
    ({"max_way": 6}, "sampler.meta_dataset.max_way"),
    ({"max_query_per_class": 0}, "sampler.meta_dataset.max_query_per_class"),
    ({"min_ways": "five"}, "sampler.meta_dataset.min_ways"),
])
def test_impossible_rules_are_refused_naming_the_key(spec, key):
    with pytest.raises(SettingError, match=rf"^{key}\b.*Fix:"):
        MetaDatasetShape.of(spec)


def test_a_split_with_too_few_classes_for_the_ways_is_refused():
    family = SyntheticImageTasks({"train": 4})
    with pytest.raises(SettingError, match=r"sampler.meta_dataset.min_ways=5.*only 4 classes"):
        episode_source(family, "train", 0, {"shape": "meta_dataset"})
    with pytest.raises(SettingError, match=r"sampler.train.shape must be one of"):
        episode_source(family, "train", 0, {"shape": "metadataset"}, key="sampler.train")


def test_a_family_without_image_classes_is_refused():
    from sharebone.data.sinusoid import SinusoidTasks

    with pytest.raises(SettingError, match=r"sampler.val.shape=meta_dataset needs a family"):
        episode_source(SinusoidTasks(), "val", 0, {"shape": "meta_dataset"}, key="sampler.val")


VARIABLE = ["sampler.train.shape=meta_dataset", "sampler.val.shape=meta_dataset",
            "sampler.meta_dataset.max_ways=8", "sampler.meta_dataset.max_support_set_size=30",
            "sampler.meta_dataset.max_query_per_class=3", "backbone.hidden=8",
            "task.image_size=16", "sampler.batches_per_epoch=2", "test.episodes=4",
            "test.settings=[{shape: meta_dataset},{n_way: 5, k_shot: 1}]"]


@pytest.mark.parametrize("regime", [
    ["regime=protonet", "sampler.meta_batch_size=2"],
    ["regime=fomaml", "regime.head=zero", "sampler.meta_batch_size=2"],
    ["regime=pretrain"],
])
def test_regimes_train_and_are_scored_on_variable_shapes(tmp_path, regime):
    from sharebone.run.train import run

    metrics = run(compose_train(tmp_path, FAST + VARIABLE + regime))
    assert 0.0 < metrics["test/meta_dataset/acc"] <= 1.0
    assert "test/5w1s/acc" in metrics and metrics["val/acc"] > 0
    table = (tmp_path / "fewshot.csv").read_text()
    assert "meta_dataset" in table


def test_a_meta_learned_head_is_refused_before_any_data(tmp_path):
    from sharebone.run.build import build_run

    for extra, key in ((["regime=maml"], "regime.head=learned"),
                       (["regime=metasgd", "regime.head=zero"], "regime.learn_step_sizes")):
        cfg = compose_train(tmp_path, FAST + VARIABLE + extra)
        with pytest.raises(SettingError, match=rf"^{key}.*Fix:"):
            build_run(cfg)


def test_ragged_batches_reach_the_model_as_floats(tmp_path):
    from sharebone.run.build import build_run

    parts = build_run(compose_train(tmp_path, FAST + VARIABLE))
    data = parts.datamodule
    batch = data.train_dataloader().dataset[0]
    assert isinstance(batch, RaggedEpisodes) and batch.num_tasks == 1
    prepared = data.on_after_batch_transfer(batch, 0)
    assert prepared.support.dtype == torch.float32


MD_COUNTS = {"ilsvrc_2012": (712, 158, 130), "aircraft": (70, 15, 15),
             "cu_birds": (140, 30, 30), "dtd": (33, 7, 7), "quickdraw": (241, 52, 52),
             "fungi": (994, 200, 200), "vgg_flower": (71, 15, 16), "traffic_sign": (0, 0, 43),
             "mscoco": (0, 40, 40)}


@pytest.mark.parametrize("source", sorted(MD_COUNTS))
def test_meta_datasets_class_splits_ship_with_the_papers_counts(source):
    from sharebone.config import CONFIG_DIR

    folder = CONFIG_DIR / "task" / "splits" / "meta_dataset" / source
    splits = []
    for split in ("train", "val", "test"):
        path = folder / f"{split}.txt"
        splits.append(path.read_text().split("\n")[:-1] if path.exists() else [])
    assert tuple(len(s) for s in splits) == MD_COUNTS[source]
    names = [n for s in splits for n in s]
    assert len(set(names)) == len(names), "splits are disjoint, no class twice"


def test_a_meta_dataset_source_trains_and_tests_on_its_own_layout(tmp_path):
    """md_dtd on a generated dtd/images/<texture>/ folder holding every class of Meta-Dataset's
    DTD split: variable-shape training, validation and the meta_dataset test row."""
    from helpers.data import make_image_folder

    from sharebone.config import CONFIG_DIR
    from sharebone.run.train import run

    splits = CONFIG_DIR / "task" / "splits" / "meta_dataset" / "dtd"
    names = [n for s in ("train", "val", "test") for n in
             (splits / f"{s}.txt").read_text().split("\n")[:-1]]
    root = make_image_folder(tmp_path / "data" / "dtd" / "images", dict.fromkeys(names, 4),
                             size=(12, 12))
    metrics = run(compose_train(tmp_path / "run", FAST + VARIABLE[:-1] + [
        "task=md_dtd", f"task.root={root}", "task.family.cache_dir=false",
        "test.settings=[{shape: meta_dataset}]"]))
    assert 0.0 < metrics["test/meta_dataset/acc"] <= 1.0
