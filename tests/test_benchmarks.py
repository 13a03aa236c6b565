"""The natural-image benchmarks as task configs (issue 11): their published class splits, and
each loader on a small generated dataset in the layout users have (real file and class
names, the real split formats)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import compose_train
from helpers.data import (
    SPLITS_DIR,
    cifar100_tar_bytes,
    cifar_classes,
    make_image_folder,
    md5_bytes,
    mini_imagenet_pickle,
    photo,
    split_lines,
    tree,
)

from sharebone.data.archives import (
    ArchiveSpec,
    ChecksumError,
    DataError,
    DataNotFoundError,
    UnsafeArchiveError,
    UnsafePickleError,
    load_data_pickle,
)
from sharebone.data.families import build_family
from sharebone.data.image_folder import sources

SPLITS = ("train", "val", "test")

#: Where each benchmark's split was taken from (repository and path, cited in its yaml).
SOURCES = {
    "mini_imagenet": "twitter/meta-learning-lstm data/miniImagenet/",
    "tiered_imagenet": "renmengye/few-shot-ssl-public fewshot/data/tiered_imagenet_split/",
    "cifar_fs": "tristandeleu/pytorch-meta\n# torchmeta/datasets/assets/cifar100/cifar-fs/",
    "fc100": "ElementAI/TADAM datasets/create_dataset_cifar100.py",
    "cub": "wyharveychen/CloserLookFewShot filelists/CUB/write_CUB_filelist.py",
}

#: Published (train, val, test) class counts.
PUBLISHED = {"mini_imagenet": (64, 16, 20), "tiered_imagenet": (351, 97, 160),
             "cifar_fs": (64, 16, 20), "fc100": (60, 20, 20), "cub": (100, 50, 50)}


# -------------------------------------------------------------------- the shipped splits


@pytest.mark.parametrize("benchmark", sorted(PUBLISHED))
def test_shipped_split_files_have_the_published_counts_and_do_not_overlap(benchmark):
    lines = {s: split_lines(benchmark, s) for s in SPLITS}
    assert tuple(len(v) for v in lines.values()) == PUBLISHED[benchmark]
    classes = {s: [line.rsplit("/", 1)[-1] for line in v] for s, v in lines.items()}
    for s in SPLITS:
        assert len(set(classes[s])) == len(classes[s]), f"{benchmark}/{s} repeats a class"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(classes[a]) & set(classes[b]), (benchmark, a, b)


def test_tiered_and_fc100_split_by_group_and_cub_by_chens_rule():
    def groups(benchmark):
        return [len({line.split("/")[0] for line in split_lines(benchmark, s)}) for s in SPLITS]

    assert groups("tiered_imagenet") == [20, 6, 8]  # categories
    assert groups("fc100") == [12, 4, 4]  # CIFAR-100 superclasses, 5 classes each
    cub = sorted(sum((split_lines("cub", s) for s in SPLITS), []))
    assert len(cub) == 200 and cub[0] == "001.Black_footed_Albatross"
    for s, rule in zip(SPLITS, (lambda i: i % 2 == 0, lambda i: i % 4 == 1,
                                lambda i: i % 4 == 3), strict=True):
        assert all(rule(cub.index(c)) for c in split_lines("cub", s))
    fine = {line.split("/")[1] for s in SPLITS for line in split_lines("fc100", s)}
    assert fine == {c for s in SPLITS for c in split_lines("cifar_fs", s)}  # all 100


@pytest.mark.parametrize("benchmark", sorted(PUBLISHED))
def test_each_benchmark_config_cites_its_split_source_and_builds(benchmark, tmp_path):
    text = (SPLITS_DIR.parent / f"{benchmark}.yaml").read_text()
    assert f"tasks/splits/{benchmark}/" in text and SOURCES[benchmark] in text
    cfg = compose_train(tmp_path, [f"task={benchmark}"])
    family = build_family(cfg.task.family)  # touches no data
    assert family.input_shape == (3, cfg.task.image_size, cfg.task.image_size)


# -------------------------------------------------------------------------------- loaders


def subset(tmp_path: Path, benchmark: str, n: int) -> dict[str, str]:
    """The first ``n`` lines of each shipped split file, as split files in ``tmp_path``."""
    out = {}
    for s in SPLITS:
        path = tmp_path / "splits" / benchmark / f"{s}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(split_lines(benchmark, s)[:n]) + "\n")
        out[s] = str(path)
    return out


def build(tmp_path: Path, task: str, root: Path, splits: dict[str, str] | None = None,
          extra: tuple[str, ...] = ()):
    overrides = [f"task={task}", f"task.root={root}",
                 f"task.family.cache_dir={tmp_path / 'cache'}", *extra]
    overrides += [f"task.family.splits.{s}={p}" for s, p in (splits or {}).items()]
    return build_family(compose_train(tmp_path / "cfg", overrides).task.family)


def wnids(benchmark: str, n: int) -> dict[str, list[str]]:
    return {s: [line.rsplit("/", 1)[-1] for line in split_lines(benchmark, s)[:n]]
            for s in SPLITS}


def test_mini_imagenet_from_its_pickled_caches(tmp_path):
    root = tmp_path / "mini_imagenet"
    root.mkdir()
    for s, names in wnids("mini_imagenet", 3).items():
        mini_imagenet_pickle(root / f"mini-imagenet-cache-{s}.pkl", names, per_class=4)
    family = build(tmp_path, "mini_imagenet", root, subset(tmp_path, "mini_imagenet", 3))
    data = family.images("test")
    assert data.class_names == sorted(wnids("mini_imagenet", 3)["test"])
    assert tuple(data.images.shape) == (12, 3, 84, 84)
    expected = np.asarray(photo(f"{data.class_names[1]}/2", (84, 84))).transpose(2, 0, 1)
    assert np.array_equal(data.images[4 + 2].numpy(), expected)  # pixels as published
    episode = family.sampler("train", 3, 1, 3, seed=0).batch(range(2))
    assert episode.query.shape == (2, 9, 3, 84, 84)


def test_mini_imagenet_pickle_of_another_split_is_named(tmp_path):
    root = tmp_path / "mini_imagenet"
    root.mkdir()
    names = wnids("mini_imagenet", 3)
    for s in SPLITS:  # the val pickle holds the test classes
        mini_imagenet_pickle(root / f"mini-imagenet-cache-{s}.pkl",
                             names["test" if s == "val" else s])
    family = build(tmp_path, "mini_imagenet", root, subset(tmp_path, "mini_imagenet", 3))
    with pytest.raises(DataError, match=r"mini-imagenet-cache-val.pkl holds other classes than "
                                        r".*val.txt lists"):
        family.images("val")


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
    victim = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    root = tmp_path / "mini_imagenet"
    root.mkdir()
    for s in SPLITS:
        (root / f"mini-imagenet-cache-{s}.pkl").write_bytes(pickle.dumps(
            {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"x": Payload()}}))
    family = build(tmp_path, "mini_imagenet", root)
    with pytest.raises(UnsafePickleError, match=r"mini-imagenet-cache-train.pkl.*asks for "
                                                r"(io|builtins)\.open"):
        family.images("train")
    assert not victim.exists()
    with pytest.raises(UnsafePickleError, match="array of Python objects"):
        load_data_pickle(pickle.dumps(np.array([1, "x"], dtype=object)), "objects.pkl")


def test_mini_imagenet_from_ravi_and_larochelles_csv_and_images_folder(tmp_path):
    root = tmp_path / "mini_imagenet"
    (root / "images").mkdir(parents=True)
    for s, names in wnids("mini_imagenet", 2).items():
        rows = ["filename,label"]
        for wnid in names:
            for i in range(1, 4):
                name = f"{wnid}{i:08d}.jpg"  # n0153282900000001.jpg, as in the CSVs
                photo(f"{wnid}/{i}", (100, 90)).save(root / "images" / name)
                rows.append(f"{name},{wnid}")
        (root / f"{s}.csv").write_text("\n".join(rows) + "\n")
    family = build(tmp_path, "mini_imagenet", root, extra=("task.image_size=21",))
    assert family.resolved_source() == "folder"
    data = family.images("val")
    assert data.class_names == sorted(wnids("mini_imagenet", 2)["val"])
    assert tuple(data.images.shape) == (6, 3, 21, 21)


def test_mini_imagenet_from_split_class_folders(tmp_path):
    root = tmp_path / "mini_imagenet"
    make_image_folder(root, {f"{s}/{w}": 3 for s, names in wnids("mini_imagenet", 2).items()
                             for w in names}, (".jpg",))
    family = build(tmp_path, "mini_imagenet", root, subset(tmp_path, "mini_imagenet", 2),
                   ("task.image_size=16",))
    assert family.images("train").class_names == sorted(wnids("mini_imagenet", 2)["train"])


def test_tiered_imagenet_folder_with_categories_as_groups(tmp_path):
    root = tmp_path / "tiered"
    classes, splits = {}, {}
    for s in SPLITS:  # two classes of each of the split's first two categories
        lines = split_lines("tiered_imagenet", s)
        first_two = sorted({line.split("/")[0] for line in lines})[:2]
        chosen = [line for c in first_two for line in lines if line.startswith(c)][:0] or [
            line for c in first_two for line in [x for x in lines if x.startswith(c)][:2]]
        for line in chosen:
            classes[f"{s}/{line.split('/')[1]}"] = 3  # root/{train,val,test}/<wnid>/
        splits[s] = tmp_path / f"{s}.txt"
        splits[s].write_text("\n".join(chosen) + "\n")
    make_image_folder(root, classes, (".jpg",))
    family = build(tmp_path, "tiered_imagenet", root, {s: str(p) for s, p in splits.items()},
                   ("task.image_size=16", "+task.family.group_episodes=true"))
    data = family.images("test")
    assert data.class_names == sorted(splits["test"].read_text().split())
    assert len(set(data.class_groups)) == 2
    assert data.class_groups == [n.split("/")[0] for n in data.class_names]
    episode = family.sampler("test", 2, 1, 1, seed=0).batch(range(20))
    assert all(len({data.class_groups[c] for c in row}) == 1
               for row in episode.classes.tolist())


def test_cub_folder_with_its_class_folder_names(tmp_path):
    root = tmp_path / "CUB_200_2011" / "images"
    make_image_folder(root, {c: 3 for s in SPLITS for c in split_lines("cub", s)[:3]},
                      (".jpg",), (50, 40))
    family = build(tmp_path, "cub", root, subset(tmp_path, "cub", 3), ("task.image_size=16",))
    data = family.images("val")
    assert data.class_names == ["002.Laysan_Albatross", "006.Least_Auklet",
                                "010.Red_winged_Blackbird"]
    assert family.augment["train"]["random_resized_crop"]["scale"] == [0.08, 1.0]


@pytest.fixture
def cifar_mirror(tmp_path, monkeypatch) -> ArchiveSpec:
    """A generated cifar-100-python.tar.gz served from a file:// mirror, as the spec."""
    data = cifar100_tar_bytes()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-100-python.tar.gz").write_bytes(data)
    spec = ArchiveSpec("cifar-100-python", (mirror / "cifar-100-python.tar.gz").as_uri(),
                       md5_bytes(data), "cifar-100-python.tar.gz")
    monkeypatch.setattr(sources, "CIFAR100", spec)
    return spec


@pytest.mark.parametrize("benchmark", ["cifar_fs", "fc100"])
def test_cifar_benchmarks_from_the_downloaded_python_archive(tmp_path, cifar_mirror, benchmark):
    root = tmp_path / "cifar100"
    family = build(tmp_path, benchmark, root, extra=("+task.family.group_episodes=[test]",))
    data = family.images("test")  # downloads the archive into root, md5-checked
    assert tree(root) == ["cifar-100-python.tar.gz"]
    assert data.class_names == sorted(split_lines(benchmark, "test"))
    assert tuple(data.images.shape) == (60, 3, 32, 32)  # 3 per class, both batches pooled
    fine, _, coarse_of = cifar_classes()
    first = data.class_names[0].rsplit("/", 1)[-1]
    assert data.class_groups[0] == coarse_of[first]  # superclass as the group
    expected = np.asarray(photo(f"{first}/2", (32, 32))).transpose(2, 0, 1)
    assert np.array_equal(data.images[2].numpy(), expected)  # the one from the test batch
    episode = family.sampler("test", 3, 1, 2, seed=0).batch(range(10))
    assert all(len({data.class_groups[c] for c in row}) == 1
               for row in episode.classes.tolist())


def test_cifar_archive_with_a_wrong_md5_is_refused_and_left_alone(tmp_path, cifar_mirror):
    root = tmp_path / "cifar100"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(b"an older, different copy")
    family = build(tmp_path, "cifar_fs", root)
    with pytest.raises(ChecksumError, match=r"cifar-100-python.tar.gz has md5 .* expected"):
        family.images("train")
    assert (root / "cifar-100-python.tar.gz").read_bytes() == b"an older, different copy"
    assert tree(tmp_path / "cache") == []


def test_missing_cifar_archive_without_download_names_the_file_and_folder(tmp_path):
    root = tmp_path / "cifar100"
    family = build(tmp_path, "fc100", root, extra=("task.family.download=false",))
    with pytest.raises(DataNotFoundError) as info:
        family.images("train")
    message = str(info.value)
    assert "cifar-100-python.tar.gz" in message and str(root) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message


def local_cifar_archive(tmp_path, monkeypatch, data: bytes):
    """``data`` as the CIFAR-100 archive in a local folder, its md5 the one expected."""
    root = tmp_path / "cifar100"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(data)
    monkeypatch.setattr(sources, "CIFAR100", ArchiveSpec(
        "cifar-100-python", "https://example.invalid/x.tar.gz", md5_bytes(data),
        "cifar-100-python.tar.gz"))
    return root


@pytest.mark.parametrize("member", ["../escape", "/etc/evil", "link"])
def test_cifar_archive_with_an_unsafe_member_is_refused(tmp_path, monkeypatch, member):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"cifar-100-python/{member}" if member == "link" else member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            tar.addfile(info, io.BytesIO(b""))
    data = buffer.getvalue()
    root = local_cifar_archive(tmp_path, monkeypatch, data)
    with pytest.raises(UnsafeArchiveError):
        build(tmp_path, "cifar_fs", root).images("train")
    assert tree(tmp_path / "cifar100") == ["cifar-100-python.tar.gz"]


def test_cifar_pickles_are_read_with_the_restricted_unpickler(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (eval, ("1",))

    data = cifar100_tar_bytes(members={"cifar-100-python/meta": pickle.dumps(
        {b"fine_label_names": Payload()}, protocol=2)})
    root = local_cifar_archive(tmp_path, monkeypatch, data)
    with pytest.raises(UnsafePickleError, match=r"member cifar-100-python/meta.*"
                                                r"(__builtin__|builtins)\.eval"):
        build(tmp_path, "cifar_fs", root).images("train")


def test_cifar_at_another_size_and_in_grayscale(tmp_path, cifar_mirror):
    family = build(tmp_path, "cifar_fs", tmp_path / "cifar100",
                   extra=("task.image_size=20", "task.channels=1", "task.family.normalize=null"))
    data = family.images("val")
    assert tuple(data.images.shape) == (48, 1, 20, 20) and data.images.dtype == torch.uint8
