"""A folder of images as a task family (issue 11): layouts, the three split forms, the
memory-mapped cache, episodes within a group, augmentation on the device, and bad input."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import make_image_folder, photo, tree

from sharebone.data.archives import DataError, DataNotFoundError
from sharebone.data.augment import EpisodeTransform, augment_images, check_augment
from sharebone.data.datamodule import EpisodicDataModule
from sharebone.data.episodes import EpisodeSampler
from sharebone.data.image_folder import ImageFolderTasks

#: Two groups of three classes, 6 images each (PNG and JPEG in turn).
GROUPED = {f"{g}/{c}": 6 for g in ("birds", "fish") for c in ("a", "b", "c")}
SPLITS = {"train": ["birds/a", "fish/a", "birds/b", "fish/b"], "val": ["birds/c"],
          "test": ["fish/c"]}


def family(root: Path, cache: Path | None, **kwargs) -> ImageFolderTasks:
    kwargs.setdefault("splits", SPLITS)
    kwargs.setdefault("image_size", 12)
    return ImageFolderTasks(str(root), cache_dir=str(cache) if cache else False, **kwargs)


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "photos", GROUPED)


def cache_files(cache: Path) -> list[str]:
    return tree(cache / "image_folder")


# ---------------------------------------------------------------------- layouts and splits


def test_grouped_folder_is_read_class_by_class_with_its_groups(folder, tmp_path):
    data = family(folder, tmp_path / "cache").images("train")
    assert data.class_names == ["birds/a", "birds/b", "fish/a", "fish/b"]
    assert data.class_groups == ["birds", "birds", "fish", "fish"]
    assert tuple(data.images.shape) == (24, 3, 12, 12) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [c for c in range(4) for _ in range(6)]
    # Image 3 of fish/a (a JPEG) is decoded as load_image would decode it.
    from sharebone.data.images import load_image
    expected = load_image(folder / "fish/a/003.jpg", 12, 3, invert=False)
    assert torch.equal(data.images[2 * 6 + 3], expected)


def test_flat_folder_classes_found_by_name_from_a_class_list_file(tmp_path):
    root = make_image_folder(tmp_path / "cub", {"001.Albatross": 4, "002.Auklet": 4,
                                                "003.Bunting": 4})
    (root / "train.txt").write_text("# birds\n003.Bunting\n001.Albatross\n")
    f = family(root, tmp_path / "cache", splits={"train": "train.txt", "test": ["002.Auklet"]})
    assert f.images("train").class_names == ["001.Albatross", "003.Bunting"]
    assert f.images("train").class_groups == ["", ""]


def test_class_list_lines_may_set_the_group(folder, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("big/birds/a\nbig/birds/b\nsmall/fish/a\n")
    (lists / "test.txt").write_text("fish/c\n")
    f = family(folder, tmp_path / "cache", splits={"train": str(lists / "train.txt"),
                                                   "test": str(lists / "test.txt")})
    data = f.images("train")
    assert data.class_names == ["big/birds/a", "big/birds/b", "small/fish/a"]
    assert data.class_groups == ["big", "big", "small"]


def test_csv_split_reads_ravi_and_larochelle_layout(tmp_path):
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    rows = ["filename,label"]
    for wnid in ("n01532829", "n01558993"):
        for i in range(1, 5):
            name = f"{wnid}{i:08d}.jpg"
            photo(f"{wnid}/{i}").save(root / "images" / name)
            rows.append(f"{name},{wnid}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    data = family(root, tmp_path / "cache", splits={"train": "train.csv"}).images("train")
    assert data.class_names == ["n01532829", "n01558993"] and len(data) == 8


def test_fraction_split_is_seeded_disjoint_and_complete(tmp_path):
    root = make_image_folder(tmp_path / "r", {f"c{i:02d}": 2 for i in range(20)}, (".png",),
                             size=(8, 8))
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}

    def names(seed):
        f = family(root, None, splits=fractions, split_seed=seed)
        return {s: f.images(s).class_names for s in fractions}

    first = names(0)
    assert [len(v) for v in first.values()] == [12, 4, 4]
    assert sorted(sum(first.values(), [])) == [f"c{i:02d}" for i in range(20)]
    assert names(0) == first and names(1) != first


# ---------------------------------------------------------------------------- the cache


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    """path -> [(start, end)] of this process's file mappings (/proc/self/maps)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.setdefault(parts[5], []).append((start, end))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cache_is_memory_mapped_and_episodes_read_it_without_a_copy(folder, tmp_path):
    f = family(folder, tmp_path / "cache")
    data = f.images("train")
    (npy,) = [p for p in (tmp_path / "cache" / "image_folder").iterdir() if p.suffix == ".npy"]
    ptr = data.images.data_ptr()
    assert any(s <= ptr < e for s, e in mapped_files().get(str(npy), []))
    sampler = f.sampler("train", 2, 1, 2, seed=0)
    assert sampler.images.data_ptr() == ptr  # the mapped tensor itself, not a sorted copy
    episode = sampler.batch(range(3))
    assert episode.support.shape == (3, 2, 3, 12, 12)
    assert np.load(npy, mmap_mode="r").shape == (24, 3, 12, 12)


def test_cache_is_reused_then_rebuilt_for_other_settings_or_changed_files(folder, tmp_path,
                                                                          capsys):
    cache = tmp_path / "cache"
    first = family(folder, cache).images("val")
    assert "decoding split 'val'" in capsys.readouterr().err
    again = family(folder, cache).images("val")
    assert torch.equal(first.images, again.images)
    assert "decoding" not in capsys.readouterr().err  # a cache hit decodes nothing
    family(folder, cache, image_size=10).images("val")  # another size: another cache
    assert "decoding split 'val'" in capsys.readouterr().err
    assert len([p for p in cache_files(cache) if p.endswith(".npy")]) == 2
    photo("birds/c/x", (20, 16)).save(folder / "birds" / "c" / "000.png")  # new contents
    os.utime(folder / "birds" / "c" / "000.png", ns=(1, 1))
    changed = family(folder, cache).images("val")
    assert "decoding split 'val'" in capsys.readouterr().err
    assert not torch.equal(changed.images[0], first.images[0])


@pytest.mark.parametrize("damage", ["truncated", "shape", "replaced", "record", "garbage"])
def test_a_cache_that_does_not_match_is_rebuilt_never_trusted(folder, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    good = family(folder, cache).images("val").images.clone()
    npy = next(p for p in (cache / "image_folder").iterdir() if p.suffix == ".npy")
    record = npy.with_suffix(".json")
    if damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "shape":  # a valid .npy of another shape
        np.save(npy, np.zeros((5, 3, 12, 12), np.uint8))
    elif damage == "replaced":  # a valid .npy of the same shape, written since
        np.save(npy, np.zeros((6, 3, 12, 12), np.uint8))
    elif damage == "record":
        meta = json.loads(record.read_text())
        meta["counts"] = [5, 1]
        record.write_text(json.dumps(meta))
    else:
        npy.write_bytes(b"not an npy file at all")
    rebuilt = family(folder, cache).images("val")
    assert "rebuilding" in caplog.text
    assert torch.equal(rebuilt.images, good)
    assert np.load(npy).shape == (6, 3, 12, 12)  # a good file is back in place


def test_decoding_shows_progress_without_a_terminal_and_writes_nothing_half(folder, tmp_path,
                                                                            capsys):
    family(folder, tmp_path / "cache", workers=2).images("train")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"decoding split 'train' of .*: 24/24 images \(100%\), \d+/s$", err.rstrip())
    assert not [p for p in cache_files(tmp_path / "cache") if p.endswith(".tmp")]


def test_no_cache_decodes_into_memory(folder, tmp_path):
    data = family(folder, None).images("test")
    assert data.n_classes == 1 and len(data) == 6


# ------------------------------------------------------------------------ episodes by group


def test_group_episodes_draw_every_class_of_an_episode_from_one_group(folder, tmp_path):
    f = family(folder, tmp_path / "cache", group_episodes=True)
    data = f.images("train")
    episode = f.sampler("train", 2, 1, 1, seed=3).batch(range(64))
    groups = [{data.class_groups[c] for c in row} for row in episode.classes.tolist()]
    assert all(len(g) == 1 for g in groups)
    assert {g.pop() for g in groups} == {"birds", "fish"}  # both groups get chosen
    again = f.sampler("train", 2, 1, 1, seed=3).batch([5, 17])
    assert torch.equal(again.classes, episode.classes[[5, 17]])  # addressable


def test_a_group_smaller_than_n_way_is_never_chosen_and_none_is_an_error():
    images = torch.zeros(12, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(12) // 2  # 6 classes: groups a (3 classes), b (2), c (1)
    groups = ["a", "a", "a", "b", "b", "c"]
    sampler = EpisodeSampler(images, labels, 3, 1, 1, groups=groups, group_episodes=True)
    assert set(sampler.batch(range(100)).classes.flatten().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"4-way episodes within one group need a group of at "
                                         r"least 4 classes.*\('a'\) has only 3"):
        EpisodeSampler(images, labels, 4, 1, 1, groups=groups, group_episodes=True)


def test_without_group_episodes_the_episodes_are_unchanged():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    labels = torch.arange(40) // 10
    plain = EpisodeSampler(images, labels, 2, 1, 3, seed=5).batch(range(8))
    grouped = EpisodeSampler(images, labels, 2, 1, 3, seed=5, groups=["x"] * 4).batch(range(8))
    assert torch.equal(plain.support, grouped.support) and torch.equal(plain.query,
                                                                       grouped.query)


def test_group_episodes_on_a_folder_without_groups_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "flat", {"a": 3, "b": 3, "c": 3}, (".png",), (8, 8))
    f = family(root, None, splits={"train": 1.0}, group_episodes=True)
    with pytest.raises(ValueError, match="group_episodes: the classes of split 'train' have no "
                                         "groups"):
        f.sampler("train", 2, 1, 1, seed=0)


# ------------------------------------------------------------------------------ augmentation


def sampler_with(augment=None, normalize=None, seed=0):
    images = torch.randint(0, 256, (60, 3, 10, 10), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    transform = EpisodeTransform(seed, "train", augment, normalize)
    return EpisodeSampler(images, torch.arange(60) // 6, 5, 2, 3, seed=seed, split="train",
                          transform=transform if transform else None)


AUGMENT = {"random_resized_crop": True, "horizontal_flip": 0.5,
           "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}


def test_augmentation_is_a_pure_function_of_the_episode_index():
    sampler = sampler_with(AUGMENT)
    batch = sampler.prepare(sampler.batch(range(8)))
    alone = sampler.prepare(sampler.batch([6]))
    torch.testing.assert_close(alone.query[0], batch.query[6])
    torch.testing.assert_close(alone.support[0], batch.support[6])
    plain = sampler.batch(range(8)).to_float()
    assert not torch.allclose(batch.support, plain.support)
    assert not torch.allclose(sampler_with(AUGMENT, seed=1).prepare(sampler.batch(range(8))
                                                                    ).support, batch.support)


def test_every_image_of_a_batch_gets_its_own_random_parameters():
    one = torch.randint(0, 256, (1, 1, 3, 10, 10), dtype=torch.uint8)
    out = EpisodeTransform(0, "train", AUGMENT).images(one.expand(1, 50, 3, 10, 10),
                                                       torch.tensor([0]))
    assert out[0].flatten(1).unique(dim=0).shape[0] == 50


def test_no_augmentation_is_exactly_pixels_over_255():
    sampler = sampler_with()
    assert sampler.transform is None
    episode = sampler.batch(range(2))
    assert torch.equal(sampler.prepare(episode).support, episode.support.float() / 255)


def test_padded_random_crop_and_flip_are_exact_pixel_shifts():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    transform = EpisodeTransform(0, "train", {"random_crop": {"padding": 2},
                                              "horizontal_flip": 0.5})
    out = transform.images(images.unsqueeze(0), torch.tensor([0]))[0]
    x = images.float() / 255
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        found = False
        for flip in (False, True):
            source = padded.flip(-1) if flip else padded
            for dy in range(5):
                for dx in range(5):
                    if torch.allclose(out[i], source[i, :, dy:dy + 8, dx:dx + 8], atol=1e-5):
                        found = True
        assert found, i


def test_normalisation_follows_augmentation_per_channel():
    images = torch.full((1, 2, 3, 4, 4), 51, dtype=torch.uint8)  # 0.2 everywhere
    transform = EpisodeTransform(0, "val", None, {"mean": [0.2, 0.1, 0.0],
                                                  "std": [0.5, 0.5, 0.1]})
    out = transform.images(images, None)
    assert out[0, 0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 2.0], abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_runs_on_the_gpu_with_the_cpus_numbers():
    sampler = sampler_with(AUGMENT, {"mean": [0.5] * 3, "std": [0.2] * 3})
    episode = sampler.batch(range(32))
    on_gpu = sampler.prepare(episode.to("cuda"))
    assert on_gpu.support.is_cuda
    torch.testing.assert_close(on_gpu.support.cpu(), sampler.prepare(episode).support,
                               atol=2e-4, rtol=1e-4)


AFFINE = {"degrees": 30, "translate": [0.1, 0.2], "scale": [0.8, 1.2], "shear": 20}


def test_random_affine_is_torchvisions_affine_with_each_images_parameters():
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from sharebone.data.augment import N_DRAWS

    images = torch.rand(6, 1, 28, 20, generator=torch.Generator().manual_seed(0))
    draws = torch.rand(6, N_DRAWS + 5, generator=torch.Generator().manual_seed(1))
    out = augment_images(images, draws, check_augment({"random_affine": AFFINE}))
    for x, u, ours in zip(images, draws[:, N_DRAWS:].tolist(), out, strict=True):
        expected = TF.affine(x, angle=(2 * u[0] - 1) * 30,
                             translate=[round((2 * u[1] - 1) * 0.1 * 20),
                                        round((2 * u[2] - 1) * 0.2 * 28)],
                             scale=0.8 + 0.4 * u[3], shear=[(2 * u[4] - 1) * 20, 0.0],
                             interpolation=InterpolationMode.BILINEAR)
        assert not torch.allclose(expected, x)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_random_affine_changes_no_other_operations_draws():
    flip = {"horizontal_flip": 0.5, "random_crop": 2}
    identity = {"degrees": 0, "translate": 0, "scale": [1, 1], "shear": 0}
    plain = sampler_with(flip).prepare(sampler_with().batch(range(4)))
    with_identity = sampler_with({**flip, "random_affine": identity}).prepare(
        sampler_with().batch(range(4)))
    torch.testing.assert_close(with_identity.support, plain.support, atol=1e-5, rtol=0)
    moved = sampler_with({**flip, "random_affine": AFFINE}).prepare(sampler_with().batch([0]))
    assert not torch.allclose(moved.support, plain.support[:1])


def test_augment_settings_are_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"augment.train.random_affine.translate must be "
                                         r"\[fx, fy\]"):
        check_augment({"random_affine": {"translate": 1.5}}, "augment.train")
    with pytest.raises(ValueError, match=r"random_affine: unknown key\(s\) \['rotate'\]"):
        check_augment({"random_affine": {"rotate": 10}})
    with pytest.raises(ValueError, match=r"random_affine.scale must be \[low, high\]"):
        check_augment({"random_affine": {"scale": [1.2, 0.8]}})
    with pytest.raises(ValueError, match=r"augment.train.color_jitter.hue must be a number in "
                                         r"\[0.0, 0.5\]"):
        check_augment({"color_jitter": {"hue": 0.9}}, "augment.train")
    with pytest.raises(ValueError, match="choose one"):
        check_augment({"random_crop": 4, "random_resized_crop": True})
    with pytest.raises(ValueError, match=r"normalize.mean must be 3 numbers"):
        ImageFolderTasks("/data", normalize={"mean": [0.5, 0.5], "std": [1, 1, 1]})
    with pytest.raises(ValueError, match=r"augment names split\(s\) \['tain'\]"):
        ImageFolderTasks("/data", augment={"tain": {"horizontal_flip": 0.5}})


def test_datamodule_applies_each_splits_transform_after_transfer(folder, tmp_path):
    f = family(folder, tmp_path / "cache", augment={"train": {"horizontal_flip": 1.0}},
               normalize={"mean": [0.5] * 3, "std": [0.25] * 3})
    dm = EpisodicDataModule(f, train={"n_way": 2, "k_shot": 1, "q_query": 2},
                            val={"n_way": 1, "k_shot": 1, "q_query": 2}, meta_batch_size=2)
    for split in ("train", "val"):
        dm.source(split)
    batch = next(iter(dm.val_dataloader()))
    val = dm.on_after_batch_transfer(batch, 0)  # no trainer: validation
    expected = (batch.support.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(val.support, expected)
    dm.stage_split = lambda: "train"
    train = dm.on_after_batch_transfer(batch, 0)
    torch.testing.assert_close(train.support, expected.flip(-1))


def test_augment_images_keeps_uint8_inputs_in_unit_range_before_normalising():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    draws = torch.rand(6, 29)
    out = augment_images(x, draws, check_augment(AUGMENT))
    assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1


# ------------------------------------------------------------------------------- bad input


def test_class_folder_with_too_few_images_is_named(tmp_path):
    root = make_image_folder(tmp_path / "r", {"many": 6, "few": 3}, (".png",), (8, 8))
    f = family(root, None, splits={"train": 1.0})
    with pytest.raises(ValueError) as info:
        f.sampler("train", 2, 2, 2, seed=0)
    assert f"{root / 'few'} has 3" in str(info.value) and "k_shot + q_query = 2 + 2" in str(
        info.value)


@pytest.mark.parametrize("content", [b"", b"not a picture", "truncated"])
def test_corrupt_images_are_refused_by_default_naming_them_and_nothing_is_cached(
        folder, tmp_path, content):
    bad = folder / "birds" / "a" / "bad.png"
    data = (folder / "birds" / "a" / "000.png").read_bytes()
    bad.write_bytes(data[:50] if content == "truncated" else content)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        family(folder, cache).images("train")
    assert str(bad) in str(info.value) and "corrupt=skip" in str(info.value)
    assert cache_files(cache) == []  # no half-written cache, no temp file


def test_corrupt_images_can_be_skipped_with_a_warning_listing_them(folder, tmp_path):
    bad = folder / "birds" / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(UserWarning, match=r"Skipped 1 image.*bad\.jpg"):
        data = family(folder, tmp_path / "cache", corrupt="skip").images("train")
    assert data.class_counts.tolist() == [6, 6, 6, 6] and len(data) == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache hit holds the same, silently
        assert len(family(folder, tmp_path / "cache", corrupt="skip").images("train")) == 24


def test_a_split_naming_classes_that_do_not_exist_lists_them(folder, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("birds/a\nowls\nfish/zz\n")
    f = family(folder, None, splits={"train": str(listing)})
    with pytest.raises(DataError) as info:
        f.images("train")
    message = str(info.value)
    assert str(listing) in message and "owls" in message and "fish/zz" in message


def test_overlapping_splits_are_refused_naming_both(folder, tmp_path):
    f = family(folder, None, splits={"train": ["birds/a", "fish/a"], "test": ["fish/c",
                                                                           "fish/a"]})
    with pytest.raises(DataError, match=r"task.family.splits.train and task.family.splits.test "
                                        r"overlap.*fish"):
        f.images("test")


def test_empty_root_and_root_that_is_a_file_and_missing_root(tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty holds no class folders with images"):
        family(tmp_path / "empty", None, splits={"train": 1.0}).images("train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt is a file, not a folder"):
        family(tmp_path / "notes.txt", None, splits={"train": 1.0}).images("train")
    with pytest.raises(DataNotFoundError, match=r"nowhere does not exist.*task.root="):
        family(tmp_path / "nowhere", None, splits={"train": 1.0}).images("train")


def test_image_directly_in_the_root_is_refused(folder):
    photo("stray/0").save(folder / "stray.png")
    with pytest.raises(DataError, match=r"stray.png is not in a class folder"):
        family(folder, None).images("train")


@pytest.mark.parametrize("what", ["folder", "file"])
def test_symlink_leaving_the_root_is_refused(folder, tmp_path, what):
    outside = make_image_folder(tmp_path / "elsewhere", {"secret": 3}, (".png",), (8, 8))
    if what == "folder":
        (folder / "birds" / "secret").symlink_to(outside / "secret")
        link = folder / "birds" / "secret"
    else:
        link = folder / "birds" / "a" / "999.png"
        link.symlink_to(outside / "secret" / "000.png")
    with pytest.raises(DataError, match=rf"{re.escape(str(link))} is a symbolic link to .*"
                                        "outside the data folder"):
        family(folder, None).images("train")


def test_a_fifo_named_like_an_image_is_not_read(folder):
    import signal

    os.mkfifo(folder / "birds" / "a" / "pipe.png")
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hangs")))
    signal.alarm(20)
    try:
        data = family(folder, None).images("train")
    finally:
        signal.alarm(0)
    assert data.class_counts.tolist() == [6, 6, 6, 6]


def test_symlink_inside_the_root_is_followed(folder):
    (folder / "fish" / "d").symlink_to(folder / "fish" / "c")
    data = family(folder, None, splits={"train": ["fish/d"]}).images("train")
    assert len(data) == 6


def test_cache_written_with_other_settings_under_this_name_is_rebuilt(folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    family(folder, cache, image_size=10).images("val")
    (small,) = [p for p in (cache / "image_folder").iterdir() if p.suffix == ".npy"]
    family(folder, cache).images("val")
    (large,) = [p for p in (cache / "image_folder").iterdir()
                if p.suffix == ".npy" and p != small]
    for suffix in (".npy", ".json"):  # the 10 px cache, renamed as the 12 px one
        large.with_suffix(suffix).write_bytes(small.with_suffix(suffix).read_bytes())
    data = family(folder, cache).images("val")
    assert "written with other settings" in caplog.text
    assert tuple(data.images.shape[1:]) == (3, 12, 12)


# ----------------------------------------------------------------------------- end to end


def test_train_and_eval_on_a_generated_folder_from_the_config(folder, tmp_path):
    from helpers.configs import compose_train

    from sharebone.run import eval as sb_eval
    from sharebone.run.train import run

    overrides = ["task=image_folder", f"task.root={folder}", "task.image_size=12",
                 "task.n_way=2", "task.k_shot=1", "task.q_query=2", "debug=fast",
                 "logger=none", "backbone=mlp", "test.q_query=2", "test.episodes=4",
                 "test.settings=[{n_way: 2, k_shot: 1}]",
                 "task.family.augment={train: {horizontal_flip: 0.5}}",
                 "task.family.splits={train: [birds/a, fish/a], val: [birds/b, fish/b], "
                 "test: [birds/b, fish/c]}"]
    with pytest.raises(DataError, match="overlap"):
        run(compose_train(tmp_path / "bad", overrides))
    overrides[-1] = ("task.family.splits={train: [birds/a, fish/a], val: [birds/b, fish/b], "
                     "test: [birds/c, fish/c]}")
    run(compose_train(tmp_path / "run", overrides))
    scoring = [f"ckpt={tmp_path / 'run'}", "episodes=3", "q_query=2",
               f"output_dir={tmp_path / 'eval'}", "settings=[{n_way: 2, k_shot: 2}]"]
    saved = sb_eval.run(compose_train(tmp_path, scoring, config_name="eval"))  # its own task
    named = sb_eval.run(compose_train(tmp_path, scoring + [  # as the README shows it
        "task=image_folder", f"task.root={folder}", "task.image_size=12",
        "task.family.splits={train: [birds/a], val: [birds/b], test: [birds/c, fish/c]}"],
        config_name="eval"))
    assert saved["results"] == named["results"]  # the same test classes, the same episodes


def test_pretraining_batches_are_augmented_and_normalised_on_the_device(folder, tmp_path):
    from helpers.configs import compose_train

    from sharebone.run.build import build_run

    cfg = compose_train(tmp_path, [
        "task=image_folder", f"task.root={folder}", "task.image_size=12", "task.n_way=2",
        "regime=pretrain", "backbone=mlp", "task.q_query=2", "test.q_query=2",
        "test.settings=[{n_way: 1, k_shot: 1}]",
        "task.family.splits={train: [birds/a, fish/a], val: [birds/b, fish/b], test: [fish/c]}",
        "task.family.augment={train: {horizontal_flip: 1.0}}",
        "task.family.normalize={mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}"])
    dm = build_run(cfg).datamodule
    batch = dm.train_dataloader().dataset[7]
    assert len(batch) == 4 and int(batch[3]) == 7  # the batch index rides along
    dm.stage_split = lambda: "train"
    inputs, targets, task = dm.on_after_batch_transfer(batch, 0)
    expected = ((batch[0].float() / 255 - 0.5) / 0.25).flip(-1)
    torch.testing.assert_close(inputs, expected)
    assert torch.equal(targets, batch[1])


def test_omniglot_small_within_scores_20_way_episodes_within_one_alphabet(shared_data_dir,
                                                                          tmp_path):
    from helpers.configs import compose_train

    from sharebone.data.families import build_family

    cfg = compose_train(tmp_path, ["task=omniglot_small_within", f"data_dir={shared_data_dir}"])
    family = build_family(cfg.task.family)
    test = family.images("test")
    for split, alphabets in (("test", {"Korean", "Sanskrit"}), ("val", {"Early_Aramaic"})):
        data = family.images(split)
        episodes = family.sampler(split, 20, 1, 15, seed=0).batch(range(40))
        chosen = [{data.class_groups[c] for c in row} for row in episodes.classes.tolist()]
        assert all(len(c) == 1 for c in chosen)
        assert set().union(*chosen) == alphabets  # Tagalog's 17 characters: never 20-way
    train = family.sampler("train", 20, 1, 15, seed=0).batch(range(8))
    assert any(len({family.images("train").class_groups[c] for c in row}) > 1
               for row in train.classes.tolist())  # training: across alphabets
    assert test.n_classes == 82
