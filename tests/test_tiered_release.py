"""tieredImageNet as Ren et al. (2018) release it (issue 11): ``<split>_images_png.pkl`` and
``<split>_labels.pkl``, generated here in that exact layout (Python 2 pickles, the real key
names, real class and category names), read through the shipped task config."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import compose_train
from helpers.data import (
    photo,
    python2_pickle,
    split_lines,
    tiered_names,
    tiered_release,
)
from PIL import Image

from sharebone.data.archives import DataError, DataNotFoundError, UnsafePickleError
from sharebone.data.families import build_family
from sharebone.data.image_folder.splits import TASKS_DIR
from sharebone.data.image_folder.tiered_release import NAMES_FILE, read_names, read_release

SPLITS = ("train", "val", "test")


def shipped(split: str) -> list[tuple[str, str]]:
    """The shipped class list of ``split`` as (category, class) wnids."""
    return [tuple(line.split("/")) for line in split_lines("tiered_imagenet", split)]


def build(tmp_path: Path, root: Path, *extra: str):
    overrides = ["task=tiered_imagenet", f"task.root={root}",
                 f"task.family.cache_dir={tmp_path / 'cache'}", *extra]
    return build_family(compose_train(tmp_path / "cfg", overrides).task.family)


def only(split: str) -> tuple[str, ...]:
    """Overrides that leave the other splits out (their pickles are not generated)."""
    return (*(f"task.family.splits.{s}=null" for s in SPLITS if s != split),
            *(("task.family.augment.train=null",) if split != "train" else ()))


def few(tmp_path: Path, n: int = 3, splits: tuple[str, ...] = SPLITS) -> tuple[str, ...]:
    """The first ``n`` classes of each shipped split as the splits (class-list files)."""
    out = []
    for s in splits:
        path = tmp_path / f"{s}.txt"
        path.write_text("\n".join(split_lines("tiered_imagenet", s)[:n]) + "\n")
        out.append(f"task.family.splits.{s}={path}")
    return tuple(out)


# ----------------------------------------------------------------------- the name table


def test_names_table_names_every_class_and_category_of_the_shipped_splits_once():
    names = read_names(TASKS_DIR / NAMES_FILE)
    pairs = [p for s in SPLITS for p in shipped(s)]
    categories = {c for c, _ in pairs}
    assert len(pairs) == 608 and len(categories) == 34
    assert {w for p in pairs for w in p} == set(names)  # every wnid, nothing else
    class_names = [names[w] for _, w in pairs]
    assert len(set(class_names)) == 608  # a release's class name means one wnid
    cut = [names[c][:46] for c in categories]  # as the release spells categories
    assert len(set(cut)) == 34
    assert all(sum(n.startswith(k) for n in names.values()) == 1 for k in cut if len(k) == 46)


@pytest.mark.parametrize("split", SPLITS)
def test_release_class_names_map_onto_the_shipped_split_files(tmp_path, split):
    pairs = shipped(split)
    tiered_release(tmp_path, split, pairs, per_class=1)
    release = read_release(tmp_path, split, read_names(TASKS_DIR / NAMES_FILE))
    assert sorted((c.group, c.name) for c in release.classes) == sorted(pairs)
    assert all(c.rows == [i] for i, c in enumerate(release.classes))


# ------------------------------------------------------------------------------ reading


def test_tiered_release_read_through_the_shipped_config_with_categories_as_groups(tmp_path):
    root = tmp_path / "tiered_imagenet"
    pairs = shipped("val")  # all 97 classes: the shipped val.txt must match the release
    pngs = tiered_release(root, "val", pairs, per_class=2)
    family = build(tmp_path, root, "+task.family.group_episodes=true", *only("val"))
    assert family.resolved_source() == "tiered_imagenet_pickle"
    data = family.images("val")
    assert data.class_names == sorted(f"{c}/{w}" for c, w in pairs)
    assert data.class_groups == [n.split("/")[0] for n in data.class_names]
    assert len(set(data.class_groups)) == 6
    assert tuple(data.images.shape) == (194, 3, 84, 84)
    # Image 1 of the pickle is class 1's first image (the release interleaves classes).
    row = data.class_names.index("/".join(pairs[1]))
    first = int(data.class_counts[:row].sum())
    expected = np.asarray(Image.open(io.BytesIO(pngs[1])).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(data.images[first].numpy(), expected)  # PNG is lossless
    assert np.array_equal(expected, np.asarray(photo(f"{pairs[1][1]}/0", (84, 84)))
                          .transpose(2, 0, 1))
    episode = family.sampler("val", 5, 1, 1, seed=0).batch(range(30))
    assert all(len({data.class_groups[c] for c in row}) == 1
               for row in episode.classes.tolist())
    cached = build(tmp_path, root, *only("val")).images("val")  # read back from the cache
    assert np.array_equal(cached.images.numpy(), data.images.numpy())


@pytest.mark.parametrize("python2", [True, False], ids=["python2", "python3"])
def test_both_pickle_dialects_read_and_a_missing_file_is_named(tmp_path, python2):
    root = tmp_path / "tiered_imagenet"
    for s in SPLITS:
        tiered_release(root, s, shipped(s)[:3], python2=python2)
    family = build(tmp_path, root, *few(tmp_path), "task.image_size=32")
    data = family.images("test")
    assert data.class_names == sorted("/".join(p) for p in shipped("test")[:3])
    assert tuple(data.images.shape) == (6, 3, 32, 32)
    (root / "train_labels.pkl").unlink()
    family = build(tmp_path, root, *few(tmp_path), "task.family.source=tiered_imagenet_pickle")
    with pytest.raises(DataNotFoundError, match=r"train_labels.pkl missing from .*Ren et al"):
        family.images("train")


def test_a_release_of_another_split_is_named(tmp_path):
    root = tmp_path / "tiered_imagenet"
    for s in SPLITS:  # the val files hold test classes
        tiered_release(root, s, shipped("test" if s == "val" else s)[:3])
    family = build(tmp_path, root, *few(tmp_path))
    with pytest.raises(DataError, match=r"val_labels.pkl holds other classes than .*val.txt"):
        family.images("val")


# ------------------------------------------------------------------------ hostile files


class Shell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Opener:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("which", ["images", "labels"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, which, payload):
    root = tmp_path / "tiered_imagenet"
    tiered_release(root, "val", shipped("val")[:2])
    victim = tmp_path / "pwned"
    evil = Shell(f"touch {victim}") if payload == "os.system" else Opener(victim)
    if which == "images":
        obj: object = [evil]
    else:
        obj = {"label_specific": np.array([0]), "label_general": np.array([0]),
               "label_specific_str": [evil], "label_general_str": ["x"]}
    (root / f"val_{'images_png' if which == 'images' else 'labels'}.pkl").write_bytes(
        pickle.dumps(obj, protocol=2))
    family = build(tmp_path, root, *only("val"))
    asks = r"(posix|os)\.system" if payload == "os.system" else r"(io|builtins)\.open"
    with pytest.raises(UnsafePickleError, match=rf"val_.*\.pkl: the pickle asks for {asks}"):
        family.images("val")
    assert not victim.exists()
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing cached


def test_labels_with_wrong_keys_or_counts_are_refused_with_what_is_wrong(tmp_path):
    root = tmp_path / "tiered_imagenet"
    pairs = shipped("val")[:2]
    tiered_release(root, "val", pairs)
    labels = root / "val_labels.pkl"
    good = labels.read_bytes()
    labels.write_bytes(python2_pickle({b"label_specific": np.array([0, 1, 0, 1]),
                                       b"labels_general": np.array([0, 0, 0, 0]),
                                       b"label_specific_str": [b"a", b"b"],
                                       b"label_general_str": [b"c"]}))
    with pytest.raises(DataError, match=r"val_labels.pkl lacks label_general \(it has"):
        read_release(root, "val")
    labels.write_bytes(good)
    (root / "val_images_png.pkl").write_bytes(python2_pickle(
        [np.zeros((5, 1), np.uint8)] * 3))  # 3 images, 4 labels
    with pytest.raises(DataError, match=r"holds 3 images, .*val_labels.pkl labels 4"):
        read_release(root, "val")
    tiered_release(root, "val", pairs)
    names = tiered_names()
    labels.write_bytes(python2_pickle({  # class 0 in two categories
        b"label_specific": np.array([0, 1, 0, 1]), b"label_general": np.array([0, 0, 1, 0]),
        b"label_specific_str": [names[w].encode() for _, w in pairs],
        b"label_general_str": [b"terrier", b"hound, hound dog"]}))
    with pytest.raises(DataError, match=r"has images in 2 categories \(terrier, hound"):
        read_release(root, "val")
    labels.write_bytes(python2_pickle({
        b"label_specific": np.array([0, 1, 0, 5]), b"label_general": np.array([0, 0, 0, 0]),
        b"label_specific_str": [b"a", b"b"], b"label_general_str": [b"c"]}))
    with pytest.raises(DataError, match=r"label_specific has labels outside 0..1"):
        read_release(root, "val")


def test_corrupt_png_bytes_follow_the_corrupt_setting(tmp_path):
    root = tmp_path / "tiered_imagenet"
    pairs = shipped("val")[:2]
    pngs = tiered_release(root, "val", pairs, per_class=3)
    images = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in pngs]
    images[2] = np.frombuffer(pngs[2][:60], np.uint8).reshape(-1, 1)  # truncated PNG
    (root / "val_images_png.pkl").write_bytes(python2_pickle(images))
    with pytest.raises(DataError, match=r"Cannot decode 1 image\(s\): image 2 of "
                                        r".*val_images_png.pkl .*corrupt=skip"):
        build(tmp_path, root, *only("val"), *few(tmp_path, 2, ("val",))).images("val")
    assert not list((tmp_path / "cache").rglob("*.npy"))
    family = build(tmp_path, root, *only("val"), *few(tmp_path, 2, ("val",)),
                   "+task.family.corrupt=skip")
    with pytest.warns(UserWarning, match=r"Skipped 1 image\(s\).*image 2 of"):
        data = family.images("val")
    assert data.class_counts.tolist() == [2, 3]  # image 2 is the first class's second
