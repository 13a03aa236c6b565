"""Meta-Dataset's class ontologies: ILSVRC episodes from one WordNet node (the DAG rule),
Omniglot's within one alphabet (the two-level rule), as ``meta_dataset/data/sampling.py``
draws them; the shipped subgraphs; refusals of a bad hierarchy before any image is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import make_image_folder

from sharebone.config import CONFIG_DIR
from sharebone.data.archives import DataError
from sharebone.data.convert import conversion_between
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.hierarchy import MAX_SPANNING_LEAVES, ClassHierarchy, split_hierarchies
from sharebone.data.image_folder import ImageFolderTasks
from sharebone.data.sources import converted_sampler
from sharebone.data.variable import MetaDatasetShape, VariableEpisodeSampler
from sharebone.errors import SettingError

ILSVRC = CONFIG_DIR / "task" / "splits" / "meta_dataset" / "ilsvrc_2012"

#: A small ontology: two families of 4 and 7 classes under one root, and a class of its own.
TREE = {"root": ("small", "big", "c11"), "small": ("c0", "c1", "c2", "c3"),
        "big": ("c4", "c5", "c6", "c7", "c8", "c9", "c10")}


def images_of(n_classes: int, per_class: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return torch.arange(labels.numel()).view(-1, 1, 1, 1), labels


def dag_sampler(min_ways: int = 3, max_ways: int = 50, seed: int = 0) -> VariableEpisodeSampler:
    images, labels = images_of(12)
    base = EpisodeSampler(images, labels, 1, 1, 1, seed=seed, class_names=[
        f"c{i}" for i in range(12)], hierarchy=ClassHierarchy(TREE))
    return VariableEpisodeSampler(base, MetaDatasetShape(min_ways=min_ways, max_ways=max_ways))


def classes_of(sampler: VariableEpisodeSampler, n: int) -> list[set[int]]:
    batch = sampler.batch(range(n))
    per_task = torch.split(batch.classes, batch.ways.tolist())
    return [set(c.tolist()) for c in per_task]


# ------------------------------------------------------------------ the DAG rule (ILSVRC)


def test_an_ilsvrc_episode_takes_every_leaf_of_one_eligible_node():
    leaves = {"root": set(range(12)), "small": {0, 1, 2, 3}, "big": set(range(4, 11))}
    seen = set()
    for classes in classes_of(dag_sampler(), 300):
        node = [name for name, under in leaves.items() if classes == under]
        assert len(node) == 1, f"{sorted(classes)} is not one node's leaves"
        seen.add(node[0])
    assert seen == set(leaves), "every eligible node is chosen"


def test_a_node_spanning_more_than_max_ways_gives_max_ways_of_its_leaves():
    eligible = [set(range(12)), {0, 1, 2, 3}, set(range(4, 11))]
    episodes = classes_of(dag_sampler(max_ways=5), 300)
    assert {len(c) for c in episodes} == {4, 5}
    for classes in episodes:
        assert any(classes <= node for node in eligible if len(node) >= len(classes))
    assert len({frozenset(c) for c in episodes if len(c) == 5}) > 10  # random subsets


def test_nodes_spanning_fewer_than_min_ways_are_never_chosen():
    episodes = classes_of(dag_sampler(min_ways=5), 200)
    assert {len(c) for c in episodes} == {7, 12}


def test_hierarchical_episodes_stay_a_pure_function_of_their_index():
    sampler = dag_sampler(max_ways=6)
    together = sampler.batch([5, 17, 2, 40])
    for t, i in enumerate([5, 17, 2, 40]):
        alone = sampler[i]
        assert torch.equal(together.task(t).support, alone.support)
        assert torch.equal(together.task(t).query, alone.query)
    other = dag_sampler(max_ways=6, seed=1)
    assert any(not torch.equal(other[i].support, sampler[i].support) for i in range(5))


def test_without_a_hierarchy_episodes_are_unchanged():
    images, labels = images_of(12)
    plain = VariableEpisodeSampler(EpisodeSampler(images, labels, 1, 1, 1),
                                   MetaDatasetShape(min_ways=3))
    named = VariableEpisodeSampler(EpisodeSampler(images, labels, 1, 1, 1, groups=["a"] * 12,
                                                  class_names=[f"c{i}" for i in range(12)]),
                                   MetaDatasetShape(min_ways=3))
    assert plain.pools is None and named.pools is None
    for i in range(20):
        assert torch.equal(plain[i].support, named[i].support)


# ------------------------------------------------------------- the two-level rule (Omniglot)


def test_an_omniglot_episode_stays_within_one_alphabet_with_ways_up_to_its_size():
    images, labels = images_of(14)
    groups = ["a"] * 4 + ["b"] * 10
    base = EpisodeSampler(images, labels, 1, 1, 1, groups=groups, hierarchy="groups")
    sampler = VariableEpisodeSampler(base, MetaDatasetShape(min_ways=2, max_ways=8))
    ways = {"a": set(), "b": set()}
    for classes in classes_of(sampler, 400):
        group = {groups[c] for c in classes}
        assert len(group) == 1, f"{sorted(classes)} mixes alphabets"
        ways[group.pop()].add(len(classes))
    assert ways == {"a": {2, 3, 4}, "b": set(range(2, 9))}


def test_a_group_smaller_than_min_ways_is_refused_naming_the_key():
    images, labels = images_of(8)
    base = EpisodeSampler(images, labels, 1, 1, 1, groups=["Tagalog"] * 3 + ["Greek"] * 5,
                          hierarchy="groups")
    with pytest.raises(SettingError, match=r"sampler\.meta_dataset\.min_ways=5.*Tagalog \(3\)"):
        VariableEpisodeSampler(base, MetaDatasetShape(min_ways=5))


def test_a_converted_source_keeps_its_groups_and_hierarchy():
    images, labels = images_of(6)
    images = torch.zeros(labels.numel(), 1, 4, 4, dtype=torch.uint8)
    base = EpisodeSampler(images, labels, 1, 1, 1, groups=["a"] * 3 + ["b"] * 3,
                          hierarchy="groups")
    converted = converted_sampler(base, conversion_between(1, 4, 3, 8, "key"), "key")
    assert converted.images.shape[1:] == (3, 8, 8)
    assert converted.hierarchy == "groups"
    assert torch.equal(converted.class_group, base.class_group)
    assert converted.group_names == ["a", "b"]


# ------------------------------------------------------------------ the shipped subgraphs


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_shipped_subgraphs_hold_exactly_their_splits_classes(split):
    hierarchy = ClassHierarchy.read(ILSVRC / f"{split}_hierarchy.txt", "hierarchy")
    classes = (ILSVRC / f"{split}.txt").read_text().split()
    assert hierarchy.leaves() == set(classes)
    pools = hierarchy.pools(classes, min_ways=5)  # refuses a class no eligible node reaches
    sizes = [len(p) for p in pools]
    assert min(sizes) >= 5 and max(sizes) <= MAX_SPANNING_LEAVES
    assert set(np.concatenate(pools).tolist()) == set(range(len(classes)))


def test_ilsvrc_training_episodes_hold_related_classes():
    """On the real training subgraph: most episodes are one family of WordNet (few ways
    compared with 712), every class can be drawn, and no node is the whole split."""
    hierarchy = ClassHierarchy.read(ILSVRC / "train_hierarchy.txt", "hierarchy")
    classes = (ILSVRC / "train.txt").read_text().split()
    labels = torch.arange(len(classes)).repeat_interleave(20)
    base = EpisodeSampler(torch.zeros(labels.numel(), 1, 1, 1, dtype=torch.uint8), labels,
                          1, 1, 1, class_names=classes, hierarchy=hierarchy)
    sampler = VariableEpisodeSampler(base, MetaDatasetShape())
    ways = sampler.batch(range(500)).ways
    assert int(ways.min()) >= 5 and int(ways.max()) <= 50
    assert float(ways.float().median()) < 27.5  # uniform ways would have a median of 27.5


# ------------------------------------------------------------------ bad hierarchies


@pytest.mark.parametrize("text,error", [
    ("animal dog cat\ndog\n", "line 2 names node 'dog' without children"),
    ("animal dog\nanimal cat\n", "line 2 lists node 'animal' a second time"),
    ("a b\nb c\nc a\n", "cycle"),
    ("# nothing\n", "holds no node"),
])
def test_a_malformed_hierarchy_file_is_refused_naming_the_key(tmp_path, text, error):
    path = tmp_path / "h.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"task\.family\.hierarchy\.train: .*{error}"):
        ClassHierarchy.read(path, "task.family.hierarchy.train")


def test_a_hierarchy_file_that_is_not_text_or_too_large_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "h.txt"
    path.write_bytes(b"\xff\xfe a b")
    with pytest.raises(DataError, match="not UTF-8"):
        ClassHierarchy.read(path, "key")
    from sharebone.data import hierarchy
    path.write_text("a b c\n")
    monkeypatch.setattr(hierarchy, "MAX_FILE_BYTES", 3)
    with pytest.raises(DataError, match="more than a class hierarchy's 3 limit"):
        ClassHierarchy.read(path, "key")


def test_classes_outside_the_hierarchy_or_unreachable_are_refused():
    tree = ClassHierarchy(TREE)
    with pytest.raises(SettingError, match="1 class.*not leaves.*e.g. zebra"):
        tree.pools(["c0", "zebra"], min_ways=2, key="k")
    with pytest.raises(SettingError, match="no node .* spans between min_ways=13"):
        tree.pools([f"c{i}" for i in range(12)], min_ways=13, key="k")
    with pytest.raises(SettingError, match="5 class.*under no node spanning .* e.g. c0"):
        tree.pools([f"c{i}" for i in range(12)], min_ways=5, key="k", max_span=10)


def test_split_hierarchies_refuse_unknown_splits_and_values():
    with pytest.raises(SettingError, match=r"task\.family\.hierarchy\.tset: no such split"):
        split_hierarchies({"tset": "groups"}, ["train", "test"])
    with pytest.raises(SettingError, match=r"task\.family\.hierarchy must be null, 'groups'"):
        split_hierarchies("wordnet", ["train"])
    with pytest.raises(SettingError, match=r"hierarchy\.train must be groups or null"):
        split_hierarchies({"train": "file.txt"}, ["train"])  # Omniglot: no files
    assert split_hierarchies("groups", ["train", "val"]) == {"train": "groups",
                                                             "val": "groups"}


def test_a_folder_class_missing_from_its_hierarchy_is_refused_before_decoding(tmp_path: Path):
    root = make_image_folder(tmp_path / "imgs", {"n01": 3, "n02": 3, "n03": 3}, size=(8, 8))
    (tmp_path / "h.txt").write_text("root n01 n02\n")
    cache = tmp_path / "cache"
    family = ImageFolderTasks(str(root), splits={"train": 1.0}, image_size=8,
                              cache_dir=str(cache),
                              hierarchy={"train": str(tmp_path / "h.txt")})
    with pytest.raises(SettingError, match=r"task\.family\.hierarchy\.train: 1 class.*n03"):
        family.sampler("train", 1, 1, 1, seed=0)
    assert not cache.exists() or not any(cache.iterdir()), "nothing was decoded"


def test_a_folder_hierarchy_draws_from_its_nodes_end_to_end(tmp_path: Path):
    names = {f"n{i:02d}": 4 for i in range(6)}
    root = make_image_folder(tmp_path / "imgs", names, size=(8, 8))
    (tmp_path / "h.txt").write_text("root a b\na n00 n01 n02\nb n03 n04 n05\n")
    family = ImageFolderTasks(str(root), splits={"train": 1.0}, image_size=8,
                              cache_dir=str(tmp_path / "cache"),
                              hierarchy={"train": str(tmp_path / "h.txt")})
    base = family.sampler("train", 1, 1, 1, seed=0)
    sampler = VariableEpisodeSampler(base, MetaDatasetShape(min_ways=3, max_ways=6))
    batch = sampler.batch(range(60))
    groups = [{base.class_names[c] for c in t.tolist()}
              for t in torch.split(batch.classes, batch.ways.tolist())]
    assert {frozenset(g) for g in groups} == {frozenset(names), frozenset(["n00", "n01", "n02"]),
                                              frozenset(["n03", "n04", "n05"])}
