"""The episode sampler: shapes, addressability, validity of every episode, clear errors."""

from __future__ import annotations

import pytest
import torch

from sharebone.data.episodes import Episode, EpisodeSampler
from sharebone.data.tasks import EpochOffsetSampler, MetaBatches


def toy_data(n_classes: int = 12, per_class: int = 10):
    # Image value encodes (class, index) so we can check what was picked.
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    ids = torch.arange(n_classes * per_class)
    images = ids.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return images, labels


def test_batch_shapes_and_way_major_labels():
    images, labels = toy_data()
    sampler = EpisodeSampler(images, labels, n_way=3, k_shot=2, q_query=4, seed=1)
    ep = sampler.batch(range(5))
    assert ep.support.shape == (5, 6, 1, 2, 2)
    assert ep.query.shape == (5, 12, 1, 2, 2)
    assert ep.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.query_labels[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ep.classes.shape == (5, 3) and ep.n_way == 3 and ep.num_tasks == 5


def test_every_episode_is_valid():
    images, labels = toy_data()
    sampler = EpisodeSampler(images, labels, n_way=4, k_shot=3, q_query=5, seed=7)
    ep = sampler.batch(range(200))
    for t in range(200):
        classes = ep.classes[t]
        assert len(set(classes.tolist())) == 4, "ways must be distinct classes"
        ids = torch.cat([ep.support[t], ep.query[t]]).flatten(1)[:, 0]
        assert len(set(ids.tolist())) == ids.numel(), "no image twice in one episode"
        parts = ((ep.support[t], ep.support_labels[t]), (ep.query[t], ep.query_labels[t]))
        for images_, labels_ in parts:
            true_class = labels[images_.flatten(1)[:, 0]]
            assert torch.equal(true_class, classes[labels_]), "label j must be class classes[j]"


def test_episode_i_is_a_pure_function_of_seed_split_index():
    images, labels = toy_data()
    a = EpisodeSampler(images, labels, 3, 1, 2, seed=5, split="train")
    b = EpisodeSampler(images, labels, 3, 1, 2, seed=5, split="train")
    batch = a.batch([9, 3, 100])
    # Same episode alone, in another order, from another instance.
    assert torch.equal(b[3].support, batch.support[1])
    assert torch.equal(b.batch([100, 9]).query[1], batch.query[0])
    other_seed = EpisodeSampler(images, labels, 3, 1, 2, seed=6, split="train").batch(range(50))
    other_split = EpisodeSampler(images, labels, 3, 1, 2, seed=5, split="val").batch(range(50))
    same = a.batch(range(50))
    assert not torch.equal(same.support, other_seed.support)
    assert not torch.equal(same.support, other_split.support)


def test_classes_and_images_are_drawn_uniformly():
    images, labels = toy_data(n_classes=10, per_class=10)
    ep = EpisodeSampler(images, labels, 2, 1, 1, seed=0).batch(range(5000))
    counts = torch.bincount(ep.classes.flatten(), minlength=10).float()
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
    picks = torch.bincount(ep.support.flatten(1)[:, 0], minlength=100).float()
    assert picks.min() > 0 and picks.max() < 2 * picks.mean()


def test_uneven_class_sizes_never_pick_past_a_class():
    labels = torch.tensor([0] * 3 + [1] * 10 + [2] * 5)
    images = torch.arange(18).view(-1, 1, 1, 1)
    ep = EpisodeSampler(images, labels, 3, 1, 2, seed=0).batch(range(300))
    for t in range(300):
        true_class = labels[ep.query[t].flatten()]
        assert torch.equal(true_class, ep.classes[t][ep.query_labels[t]])


def test_too_many_ways_is_refused_with_the_numbers():
    images, labels = toy_data(n_classes=4)
    with pytest.raises(ValueError, match=r"5-way episodes need 5 classes.*only 4"):
        EpisodeSampler(images, labels, n_way=5, k_shot=1, q_query=1, split="test")


def test_too_many_shots_is_refused_with_the_numbers():
    images, labels = toy_data(per_class=10)
    with pytest.raises(ValueError, match=r"k_shot \+ q_query = 5 \+ 6 = 11.*only 10"):
        EpisodeSampler(images, labels, n_way=2, k_shot=5, q_query=6)


@pytest.mark.parametrize("kwargs", [{"n_way": 0}, {"k_shot": 0}, {"q_query": -1}, {"n_way": 2.5}])
def test_nonsense_settings_are_refused(kwargs):
    images, labels = toy_data()
    settings = {"n_way": 2, "k_shot": 1, "q_query": 1, **kwargs}
    with pytest.raises(ValueError, match="must be an integer"):
        EpisodeSampler(images, labels, **settings)


def test_meta_batches_on_huge_pages_hold_the_same_pixels(monkeypatch):
    # 84x84x3, 32 5-way 5-shot 15-query episodes: 68 MB, gathered into huge-page memory.
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 84, 84), dtype=torch.uint8, generator=gen)
    sampler = EpisodeSampler(images, torch.arange(400) // 20, n_way=5, k_shot=5, q_query=15)
    huge = sampler.batch(range(32))
    huge_float = huge.to_float()
    monkeypatch.setattr("sharebone.memory.HUGE_MIN_BYTES", 2**62)  # plain torch.empty
    plain = sampler.batch(range(32))
    assert huge.support.shape == (32, 25, 3, 84, 84) and huge.query.shape == (32, 75, 3, 84, 84)
    assert torch.equal(huge.support, plain.support) and torch.equal(huge.query, plain.query)
    assert torch.equal(huge_float.query, plain.query.float() / 255)
    assert torch.equal(huge_float.support, plain.to_float().support)


def test_to_float_scales_uint8_only():
    ep = Episode(torch.full((1, 2, 1, 1, 1), 255, dtype=torch.uint8), torch.zeros(1, 2),
                 torch.zeros(1, 2, 1), torch.zeros(1, 2), torch.zeros(1, 2))
    f = ep.to_float()
    assert f.support.dtype == torch.float32 and f.support.max().item() == 1.0
    assert f.query is ep.query


def test_ddp_ranks_split_each_meta_batch_disjointly():
    images, labels = toy_data()
    sampler = EpisodeSampler(images, labels, 3, 1, 2, seed=0)
    whole = MetaBatches(sampler, size=4, length=10)
    ranks = [MetaBatches(sampler, size=4, length=10, rank=r, world_size=2) for r in range(2)]
    for b in (0, 7):
        parts = [r[b] for r in ranks]
        assert torch.equal(torch.cat([p.support for p in parts]), whole[b].support)
        assert set(ranks[0].indices(b).tolist()).isdisjoint(ranks[1].indices(b).tolist())
    with pytest.raises(ValueError, match="multiple of 2"):
        MetaBatches(sampler, size=3, length=1, world_size=2)


def test_each_epoch_sees_fresh_meta_batches():
    s = EpochOffsetSampler(num_batches=3)
    first = list(s)
    s.set_epoch(1)
    assert first == [0, 1, 2] and list(s) == [3, 4, 5] and len(s) == 3
