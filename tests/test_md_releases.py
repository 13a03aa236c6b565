"""Meta-Dataset's sources read in their real release layouts (generated, tiny): classes named
as the published split files name them, crops as the official converter makes them, and bad
releases refused before any image is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.configs import compose_train
from helpers.data import write_archive
from helpers.md_releases import (
    OMNIGLOT_BACKGROUND,
    make_aircraft,
    make_coco,
    make_fungi,
    make_gtsrb,
    make_quickdraw,
    make_vgg_flower,
    mat_v5,
)

from sharebone.data.archives import DataError, DataNotFoundError
from sharebone.data.families import build_family
from sharebone.data.image_folder import ImageFolderTasks
from sharebone.data.image_folder.md_releases import coco_box, read_mat_array
from sharebone.data.omniglot import load_split
from sharebone.errors import SettingError


def family(root: Path, source: str, splits: dict, tmp_path: Path, size: int = 8,
           channels: int = 3, **kw) -> ImageFolderTasks:
    return ImageFolderTasks(str(root), splits=splits, image_size=size, channels=channels,
                            source=source, cache_dir=str(tmp_path / "cache"), workers=1, **kw)


def lines(tmp_path: Path, name: str, entries: list[str]) -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(entries) + "\n")
    return str(path)


def mean_rgb(images) -> np.ndarray:
    return images.float().mean(dim=(0, 2, 3)).numpy()


def test_aircraft_classes_are_variants_cropped_to_their_boxes(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b",
                         {"737-400": 3, "A340-300": 3, "Falcon 2000": 3})
    tasks = family(root, "aircraft", {"train": lines(tmp_path, "tr", ["A340-300", "Falcon 2000"]),
                                      "test": lines(tmp_path, "te", ["737-400"])}, tmp_path)
    train = tasks.images("train")
    assert train.class_names == ["A340-300", "Falcon 2000"]
    assert train.class_counts.tolist() == [3, 3]
    r, g, b = mean_rgb(train.images)
    assert r > 180 and g < 60 and b < 60  # the box only: no blue half, no green banner
    assert tasks.images("test").class_names == ["737-400"]


def test_vgg_flower_labels_from_the_mat_file_named_by_the_split_lines(tmp_path):
    labels = [1, 2, 3, 1, 2, 3, 5, 5]
    root = make_vgg_flower(tmp_path / "vgg_flower", labels)
    tasks = family(root, "vgg_flower", {
        "train": lines(tmp_path, "tr", ["001.pink primrose", "005.english marigold"]),
        "val": lines(tmp_path, "va", ["002.hard-leaved pocket orchid", "003.canterbury bells"])},
        tmp_path)
    assert tasks.images("train").class_names == ["001.pink primrose", "005.english marigold"]
    assert tasks.images("train").class_counts.tolist() == [2, 2]
    assert tasks.images("val").class_counts.tolist() == [2, 2]


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_reads_matlab_v5_numeric_arrays(tmp_path, compress):
    values = np.array([3, 1, 102, 7], np.float64)
    path = tmp_path / "labels.mat"
    path.write_bytes(mat_v5("labels", values, compress))
    assert read_mat_array(path, "labels").ravel().tolist() == values.tolist()
    with pytest.raises(DataError, match="no numeric array 'setid'"):
        read_mat_array(path, "setid")
    path.write_bytes(b"\x80\x04 a pickle, not a mat file" * 10)
    with pytest.raises(DataError, match="not a MATLAB 5"):
        read_mat_array(path, "labels")


def test_mat_reader_reads_what_scipy_writes(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")  # an optional cross-check with another writer
    for compress in (False, True):
        path = tmp_path / f"s{compress}.mat"
        scipy_io.savemat(path, {"labels": np.array([[4.0, 2.0, 9.0]])}, do_compression=compress)
        assert read_mat_array(path, "labels").ravel().tolist() == [4.0, 2.0, 9.0]


def test_fungi_reads_both_annotation_files(tmp_path):
    root = make_fungi(tmp_path / "fungi", {0: ("Abortiporus biennis", 3),
                                           4: ("Agaricus augustus", 4),
                                           8: ("Agaricus campestris", 2)})
    tasks = family(root, "fungi", {"train": lines(tmp_path, "tr", ["0000.Abortiporus biennis",
                                                                   "0004.Agaricus augustus"]),
                                   "test": 1.0}, tmp_path)
    assert tasks.images("train").class_counts.tolist() == [3, 4]  # train.json + val.json
    assert tasks.images("test").class_names == ["0008.Agaricus campestris"]


@pytest.mark.parametrize("flat", [True, False])
def test_quickdraw_npy_bitmaps_exact_and_capped(tmp_path, flat):
    root = make_quickdraw(tmp_path / "quickdraw", {"ant": 5, "axe": 4, "swan": 3}, flat=flat)
    tasks = family(root, "quickdraw", {"train": lines(tmp_path, "tr", ["ant", "swan"]),
                                       "test": lines(tmp_path, "te", ["axe"])}, tmp_path,
                   size=28, channels=1, max_per_class=4)
    train = tasks.images("train")
    assert train.class_counts.tolist() == [4, 3]
    ant = np.load(root / "ant.npy").reshape(-1, 28, 28)
    assert np.array_equal(train.images[:4, 0].numpy(), ant[:4])  # 28 px: the bitmaps as they are


def test_traffic_signs_numbered_by_folder_whole_or_roi(tmp_path):
    root = make_gtsrb(tmp_path / "GTSRB", n_classes=3, per_class=2)
    test = lines(tmp_path, "te", ["00.Speed limit (20km/h)", "01.Speed limit (30km/h)",
                                  "02.Speed limit (50km/h)"])
    whole = family(root, "traffic_sign", {"test": test}, tmp_path).images("test")
    assert whole.class_names[0] == "00.Speed limit (20km/h)"
    r, _, b = mean_rgb(whole.images)
    assert abs(r - b) < 40  # half red, half blue
    roi = family(root, "traffic_sign", {"test": test}, tmp_path, roi=True).images("test")
    r, _, b = mean_rgb(roi.images)
    assert r > 180 and b < 60


def test_mscoco_objects_are_enlarged_box_crops(tmp_path):
    root = make_coco(tmp_path / "mscoco", {1: "person", 2: "bicycle", 3: "car"}, per_class=2)
    tasks = family(root, "mscoco", {"val": lines(tmp_path, "va", ["person"]),
                                    "test": lines(tmp_path, "te", ["bicycle", "car"])}, tmp_path)
    test = tasks.images("test")
    assert test.class_names == ["bicycle", "car"] and test.class_counts.tolist() == [2, 2]
    r, _, b = mean_rgb(test.images)
    assert r > 180 and b < 60  # the 1.2x box is the red object, not the blue image
    assert coco_box([12.0, 12.0, 16.0, 16.0], (60, 60)) == (10, 10, 30, 30)


def test_md_omniglot_splits_by_meta_datasets_alphabets(tmp_path):
    cfg = compose_train(tmp_path, ["task=md_omniglot"])
    mirror = tmp_path / "mirror"
    registry = {
        "images_background": write_archive(mirror, "images_background", omniglot_zip(
            "images_background", OMNIGLOT_BACKGROUND)),
        "images_evaluation": write_archive(mirror, "images_evaluation", omniglot_zip(
            "images_evaluation", ["Angelic", "Keble", "ULOG"]))}
    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    for spec in registry.values():
        (data / spec.filename).write_bytes((mirror / spec.filename).read_bytes())
    alphabets = {}
    for split, spec in cfg.task.family.splits.items():
        images = load_split(spec, tmp_path / "data", None, 8, download=False, archives=registry)
        alphabets[split] = {n.split("/")[0] for n in images.class_names}
    assert len(alphabets["train"]) == 25 and len(alphabets["val"]) == 5
    assert alphabets["val"] == {"Blackfoot_(Canadian_Aboriginal_Syllabics)", "Tagalog",
                                "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Alphabet_of_the_Magi",
                                "Inuktitut_(Canadian_Aboriginal_Syllabics)"}
    assert alphabets["test"] == {"Angelic", "Keble", "ULOG"}


def omniglot_zip(top: str, alphabets: list[str]) -> bytes:
    from helpers.data import omniglot_zip_bytes
    return omniglot_zip_bytes(top, dict.fromkeys(alphabets, 1), n_images=2)


# ---------------------------------------------------------------- the shipped configs


@pytest.mark.parametrize("source,expected", [
    ("aircraft", {"train": 70, "val": 15, "test": 15}),
    ("vgg_flower", {"train": 71, "val": 15, "test": 16}),
    ("traffic_sign", {"test": 43}),
    ("mscoco", {"val": 40, "test": 40})])
def test_shipped_configs_read_the_published_splits(tmp_path, source, expected):
    """Each md_<source> config on a release holding every class of the published splits."""
    cfg = compose_train(tmp_path, [f"task=md_{source}", f"data_dir={tmp_path / 'data'}",
                                   f"cache_dir={tmp_path / 'cache'}", "task.image_size=4"])
    names = [n for s in expected for n in split_names(source, s)]
    root = Path(cfg.task.root)
    if source == "aircraft":
        make_aircraft(root, dict.fromkeys(names, 1))
    elif source == "vgg_flower":
        make_vgg_flower(root, [int(n[:3]) for n in names])
    elif source == "traffic_sign":
        make_gtsrb(root, 43, 1)
    else:
        make_coco(root, {i + 1: n for i, n in enumerate(names)}, 1)
    tasks = build_family(cfg.task.family)
    for split, count in expected.items():
        images = tasks.images(split)
        assert images.n_classes == count and sorted(images.class_names) == sorted(
            split_names(source, split))


def split_names(source: str, split: str) -> list[str]:
    from helpers.data import SPLITS_DIR
    text = (SPLITS_DIR / "meta_dataset" / source / f"{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------- bad input


def test_missing_annotation_file_is_named_before_decoding(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b", {"A318": 2})
    (root / "data" / "images_box.txt").unlink()
    tasks = family(root, "aircraft", {"train": 1.0}, tmp_path)
    with pytest.raises(DataNotFoundError, match=r"images_box\.txt is missing.*source=aircraft"):
        tasks.images("train")
    assert not (tmp_path / "cache").exists()


def test_split_line_the_release_lacks_is_refused_naming_the_file(tmp_path):
    root = make_fungi(tmp_path / "fungi", {0: ("Abortiporus biennis", 2)})
    split = lines(tmp_path, "train", ["0000.Abortiporus biennis", "0099.Nonexistent fungus"])
    with pytest.raises(DataError, match=r"train\.txt names 1 class\(es\).*0099\.Nonexistent"):
        family(root, "fungi", {"train": split}, tmp_path).images("train")
    assert not (tmp_path / "cache").exists()


def test_missing_images_are_listed_before_decoding(tmp_path):
    root = make_vgg_flower(tmp_path / "vgg_flower", [1, 1, 2])
    (root / "jpg" / "image_00002.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=r"1 image\(s\).*jpg/image_00002\.jpg"):
        family(root, "vgg_flower", {"train": 1.0}, tmp_path).images("train")


def test_pickled_npy_is_refused_not_loaded(tmp_path):
    root = tmp_path / "quickdraw"
    root.mkdir()
    np.save(root / "ant.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain numpy array"):
        family(root, "quickdraw", {"train": 1.0}, tmp_path, channels=1).images("train")


def test_release_options_belong_to_their_source(tmp_path):
    with pytest.raises(SettingError, match="task.family.max_per_class applies to source "
                                           "quickdraw only"):
        family(tmp_path, "fungi", {"train": 1.0}, tmp_path, max_per_class=10)
    with pytest.raises(SettingError, match="task.family.roi applies to source traffic_sign"):
        family(tmp_path, "mscoco", {"train": 1.0}, tmp_path, roi=True)


def test_coco_box_is_clipped_to_the_image():
    assert coco_box([0.0, 0.0, 10.0, 10.0], (8, 8)) == (0, 0, 8, 8)


def test_md_all_trains_on_meta_datasets_eight_training_sources(tmp_path):
    cfg = compose_train(tmp_path, ["task=md_all"])
    sources = cfg.task.family.sources
    assert [s.name for s in sources] == ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds",
                                         "dtd", "quickdraw", "fungi", "vgg_flower"]
    for source in sources:  # each block builds (touching no data) as its md_<source> does
        family = build_family(source.family)
        assert family.input_shape == (source.channels, source.image_size, source.image_size)
        if source.name not in ("omniglot", "ilsvrc_2012"):
            alone = compose_train(tmp_path, [f"task=md_{source.name}"]).task.family
            assert alone.source == source.family.source
            assert dict(alone.splits) == dict(source.family.splits)
