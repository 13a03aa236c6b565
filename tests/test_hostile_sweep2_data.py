"""Issue 19, second hardening sweep, the data side: split disjointness across every split form
(class lists, YAML lists, CSV files, fractions), symbolic link loops in an image folder,
backbone sizes checked before building, temporary files a killed build left behind, timm's
pretrained weights offline, poisoned pickles refused without torch's advice to unpickle them,
and careless input files (CSV byte-order marks and repeated rows, impossible image sizes...).

Each test fails on the commit before the sweep (19e5245) unless it says it records a case that
already held.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers.crafted import pickle_bomb
from helpers.data import make_image_folder, tree

from sharebone.data.archives import DataError
from sharebone.data.image_folder import ImageFolderTasks
from sharebone.errors import SettingError, ShareboneError
from sharebone.models import create_backbone

CLASSES = {f"class{i:02d}": 4 for i in range(6)}


def family(root: Path, splits, cache: Path | None = None, **kwargs) -> ImageFolderTasks:
    return ImageFolderTasks(str(root), splits=splits, image_size=8,
                            cache_dir=str(cache) if cache else False, **kwargs)


@pytest.fixture
def flat(tmp_path) -> Path:
    """root/class00..class05/NNN.png, 4 images each."""
    return make_image_folder(tmp_path / "photos", CLASSES, (".png",), (8, 8))


def csv_rows(rows: list[tuple[str, str]], header: str = "filename,label") -> str:
    return "\n".join([header, *(f"{f},{label}" for f, label in rows)]) + "\n"


# ------------------------------------------------- 1. split disjointness across split forms


@pytest.mark.parametrize("how", ["label", "files"])
def test_a_csv_split_holding_a_training_class_of_a_class_list_is_refused(flat, how):
    # The case: train/val class lists, a test CSV; exit 0 and a test on class00.
    (flat / "train.txt").write_text("class00\nclass01\n")
    (flat / "val.txt").write_text("class02\n")
    if how == "label":  # the CSV names class00 as its class
        rows = [(f"class00/{i:03d}.png", "class00") for i in range(4)]
    else:  # another label, but class00's own images
        rows = [(f"class00/{i:03d}.png", "renamed") for i in range(4)]
    (flat / "test.csv").write_text(csv_rows(rows + [(f"{i:03d}.png", "class05")
                                                    for i in range(4)]))
    f = family(flat, {"train": "train.txt", "val": "val.txt", "test": "test.csv"})
    with pytest.raises(DataError) as info:
        f.images("test")
    message = str(info.value)
    assert "task.family.splits.train" in message and "task.family.splits.test" in message
    assert "overlap" in message and "class00" in message


def test_a_yaml_list_and_a_csv_naming_the_same_labels_are_refused(flat):
    (flat / "test.csv").write_text(csv_rows([(f"{i:03d}.png", "class03") for i in range(4)]))
    f = family(flat, {"train": ["class03", "class04"], "test": "test.csv"})
    with pytest.raises(DataError, match=r"task.family.splits.train and task.family.splits.test "
                                        r"\(.*test.csv\) overlap.*class03"):
        f.images("train")


def test_a_fraction_split_never_takes_a_class_a_csv_split_holds(flat):
    (flat / "test.csv").write_text(csv_rows([(f"{i:03d}.png", c) for c in ("class00", "class01")
                                             for i in range(4)]))
    for seed in range(4):  # on 19e5245 the fraction drew class00/class01 again
        f = family(flat, {"train": 1.0, "test": "test.csv"}, split_seed=seed)
        assert set(f.images("train").class_names) == {f"class{i:02d}" for i in range(2, 6)}


@pytest.mark.parametrize("alias", ["group", "symlink"])
def test_one_class_named_two_ways_in_two_splits_is_refused(tmp_path, alias):
    root = make_image_folder(tmp_path / "birds", {"seabirds/albatross": 3, "seabirds/gull": 3,
                                                  "finches/linnet": 3}, (".png",), (8, 8))
    if alias == "group":  # seabirds/albatross and albatross: the same folder (held already)
        splits = {"train": ["seabirds/albatross", "finches/linnet"], "test": ["albatross"]}
    else:  # a link inside the root to the same folder: the same images
        (root / "finches" / "copy").symlink_to(root / "seabirds" / "albatross")
        splits = {"train": ["seabirds/albatross"], "test": ["finches/copy"]}
    with pytest.raises(DataError, match=r"task.family.splits.train and task.family.splits.test "
                                        r"overlap"):
        family(root, splits).images("train")


def test_two_csv_files_sharing_an_image_under_other_labels_are_refused(flat):
    (flat / "a.csv").write_text(csv_rows([("000.png", "class00"), ("001.png", "class00")]))
    (flat / "b.csv").write_text(csv_rows([("class00/001.png", "other")]))
    with pytest.raises(DataError, match=r"overlap: both hold 1 image\(s\), e.g. "
                                        r"class00/001.png"):
        family(flat, {"train": "a.csv", "test": "b.csv"}).images("train")


# ----------------------------------------------------------- 2. symbolic links in a folder


def test_a_symlink_loop_in_an_image_folder_is_skipped_with_a_warning(flat):
    # A loop holds no pixels: skipped like any entry that is not an image (as a dangling link
    # always was), with a warning naming it; on 19e5245 ELOOP escaped raw from is_file().
    (flat / "class00" / "loop.png").symlink_to("loop.png")
    (flat / "looping").symlink_to("looping")
    (flat / "class01" / "gone.png").symlink_to(flat / "nowhere.png")
    with pytest.warns(UserWarning, match=r"Skipped 3 broken symbolic link\(s\).*loop.png"):
        data = family(flat, {"train": 1.0}).images("train")
    assert data.class_counts.tolist() == [4] * 6


def test_a_symlink_to_an_image_outside_the_root_is_still_refused(flat, tmp_path):
    # Held already (tests/test_image_folder.py has the folder case); recorded for the sweep.
    outside = make_image_folder(tmp_path / "secret", {"x": 1}, (".png",), (8, 8))
    (flat / "class00" / "leak.png").symlink_to(outside / "x" / "000.png")
    with pytest.raises(DataError, match=r"leak.png is a symbolic link to .*outside"):
        family(flat, {"train": 1.0}).images("train")


# ------------------------------------------------------------ 3. backbone sizes, checked


@pytest.mark.parametrize(("name", "kwargs", "key"), [
    ("conv4", {"hidden": 0}, "backbone.hidden"),
    ("conv4", {"hidden": -3}, "backbone.hidden"),
    ("conv4", {"in_channels": 0}, "backbone.in_channels"),
    ("conv4", {"image_size": 8}, "backbone.image_size"),
    ("mlp", {"hidden": [64, 0]}, r"backbone.hidden\[1\]"),
    ("mlp", {"hidden": 0}, "backbone.hidden"),
    ("mlp", {"in_features": 0}, "backbone.in_features"),
    ("resnet12", {"channels": [64, 0, 320, 640]}, r"backbone.channels\[1\]"),
    ("resnet12", {"drop_rate": -0.1}, "backbone.drop_rate"),
    ("resnet12", {"block_size": 0}, "backbone.block_size"),
    ("wrn28_10", {"widen_factor": 0}, "backbone.widen_factor"),
    ("wrn28_10", {"drop_rate": 1.0}, "backbone.drop_rate"),
])
def test_a_backbone_size_that_cannot_be_built_names_its_key(name, kwargs, key):
    with pytest.raises(SettingError, match=key):
        create_backbone(name, **kwargs)


def test_backbone_hidden_zero_is_refused_by_the_cli_before_training(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "sharebone-train"), "task=synthetic_images",
         "debug=fast", "logger=none", "backbone.hidden=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "SHAREBONE_DEBUG": "0"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error: backbone.hidden must be an integer >= 1, got 0") == 1
    assert "Traceback" not in result.stderr and "shared=" not in result.stdout


# ------------------------------------------- 4. temporary files a killed build left behind

WRITER = """
import sys, time
from sharebone.files import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"x" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def start_writer(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(Path(__file__).parents[1] / "src"), *sys.path])})
    assert proc.stdout.readline().strip() == "writing"
    return proc


def temporaries(folder: Path, target: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{target.name}."))


def test_a_killed_cache_builds_temporary_is_removed_by_the_next_build_a_live_ones_kept(
        flat, tmp_path):
    cache = tmp_path / "cache"
    family(flat, {"train": 1.0}, cache).images("train")
    (npy,) = [p for p in (cache / "image_folder").iterdir() if p.suffix == ".npy"]
    npy.unlink()  # the next run rebuilds it
    killed = start_writer(npy)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    (leftover,) = temporaries(npy.parent, npy)  # 19e5245 left it there for ever
    assert f"-{killed.pid}." in leftover
    family(flat, {"train": 1.0}, cache).images("train")
    assert temporaries(npy.parent, npy) == []
    npy.unlink()
    live = start_writer(npy)  # a concurrent build, still running
    try:
        (theirs,) = temporaries(npy.parent, npy)
        family(flat, {"train": 1.0}, cache).images("train")
        assert temporaries(npy.parent, npy) == [theirs]  # a live writer's is never removed
    finally:
        live.kill()
        live.wait(timeout=30)
    assert npy.is_file()


def test_temporaries_that_are_not_ours_or_from_another_host_are_left_alone(tmp_path):
    from sharebone.files import atomic_write

    target = tmp_path / "results.json"
    keep = [".results.json.otherhost-1.abcdefgh.tmp",  # another machine's writer (NFS)
            ".results.json.notes.tmp",  # not a name atomic_write gives
            ".results.json.abcd1234.tmp"]  # an old-style name, written just now
    for name in keep:
        (tmp_path / name).write_text("x")
    with atomic_write(target, "w") as f:
        f.write("{}")
    assert sorted(tree(tmp_path)) == sorted([*keep, "results.json"])


# ------------------------------------------------------ 5. timm's pretrained weights offline


@pytest.fixture
def hub(monkeypatch, tmp_path):
    pytest.importorskip("timm", reason="timm is an optional extra")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return constants


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_timm_pretrained_offline_fails_at_once_with_the_fix(hub, monkeypatch, offline):
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    else:  # a Hub that refuses connections: 19e5245 retried for about 45 s
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(ShareboneError) as info:
        create_backbone("timm:resnet18", pretrained=True)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "backbone.pretrained" in message and "timm.create_model('resnet18', pretrained=True)"
    assert "pretrained_cfg_overlay" in message and "backbone.pretrained=false" in message
    assert ("HF_HUB_OFFLINE" in message) == (offline == "HF_HUB_OFFLINE")


def test_timm_pretrained_weights_in_the_cache_load_offline(hub, monkeypatch):
    # Held with HF_HUB_OFFLINE before; offline without it, the cached file is now read at once.
    import timm
    from safetensors.torch import save_file

    model = "test_resnet"
    if not timm.is_model(model):
        pytest.skip(f"this timm has no {model}")
    cfg = timm.get_pretrained_cfg(model)
    weights = timm.create_model(model, num_classes=0).state_dict()
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v
               for k, v in weights.items()}
    repo = cfg.hf_hub_id.partition("@")[0]
    snapshot = Path(hub.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(weights, snapshot / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    net = create_backbone(f"timm:{model}", pretrained=True)
    loaded = net.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


# ------------------------------------------------------------- 6. poisoned pickles refused


def assert_refused_without_the_unsafe_advice(message: str) -> None:
    assert "holds code" in message and "nothing was loaded" in message
    assert "weights_only" not in message and "trust" not in message


def test_a_poisoned_checkpoint_is_refused_without_advising_weights_only_false(tmp_path):
    from sharebone.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint

    victim = tmp_path / "pwned"
    bomb = pickle_bomb(tmp_path / "last.ckpt", victim)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bomb)
    assert str(bomb) in str(info.value) and "io.open" in str(info.value)
    assert_refused_without_the_unsafe_advice(str(info.value))
    with pytest.raises(CheckpointError) as info:  # Lightning's resume path
        AtomicCheckpointIO().load_checkpoint(bomb)
    assert_refused_without_the_unsafe_advice(str(info.value))
    assert not victim.exists()


def test_a_poisoned_omniglot_cache_is_reported_without_the_unsafe_advice(fake_omniglot,
                                                                        tmp_path, caplog):
    from sharebone.data.omniglot import cache_path, load_split

    spec = fake_omniglot.archives["fake_background"]
    path = cache_path(spec, fake_omniglot.cache_dir, 28)
    path.parent.mkdir(parents=True)
    pickle_bomb(path, tmp_path / "pwned")
    with caplog.at_level(logging.WARNING):
        load_split({"archives": ["fake_background"]}, fake_omniglot.data_dir,
                   fake_omniglot.cache_dir, archives=fake_omniglot.archives)
    (record,) = [r for r in caplog.records if "corrupt or stale" in r.getMessage()]
    assert_refused_without_the_unsafe_advice(record.getMessage())


# -------------------------------------------------------- 7. careless and hostile input


def test_a_csv_with_a_byte_order_mark_reads_its_header(flat):
    # Excel's "CSV UTF-8" starts with a BOM; 19e5245 took the header for an image row.
    (flat / "test.csv").write_bytes(b"\xef\xbb\xbf" + csv_rows(
        [(f"{i:03d}.png", "class01") for i in range(4)]).encode())
    assert family(flat, {"test": "test.csv"}).images("test").class_counts.tolist() == [4]


def test_repeated_csv_rows_read_each_image_once_with_a_warning(flat):
    # An image twice in a class could be its own support and query (19e5245 read it twice).
    rows = [(f"{i:03d}.png", "class01") for i in range(4)]
    (flat / "test.csv").write_text(csv_rows(rows + rows[:2]))
    with pytest.warns(UserWarning, match=r"2 row\(s\) repeat an earlier row \(lines 6, 7\)"):
        data = family(flat, {"test": "test.csv"}).images("test")
    assert data.class_counts.tolist() == [4]


def test_one_image_under_two_labels_in_a_csv_is_refused(flat):
    (flat / "test.csv").write_text(csv_rows([("class01/000.png", "class01"),
                                             ("class01/000.png", "class02")]))
    with pytest.raises(DataError, match=r"line 3: class01/000.png is labelled 'class02', and "
                                        r"'class01' on line 2"):
        family(flat, {"test": "test.csv"}).images("test")


@pytest.mark.parametrize(("override", "match"), [
    ({"image_size": 100_000}, r"task.image_size=100000: each image .* MAX_IMAGE_PIXELS"),
    ({"image_size": 0}, r"task.image_size must be a positive int"),
    ({"channels": 2}, r"task.channels must be 1 or 3"),
    ({"resize": "squash"}, r"task.family.resize must be one of"),
])
def test_impossible_image_settings_name_their_key(flat, override, match):
    # 100000 px a side tried to allocate 559 GiB on 19e5245; the others did not name the key.
    settings = {"image_size": 8, **override}
    with pytest.raises(SettingError, match=match):
        ImageFolderTasks(str(flat), splits={"train": 1.0}, cache_dir=False, **settings)


def test_cases_that_already_held(flat, tmp_path):
    """Recorded for the sweep's tally: these gave a clear error or worked before it."""
    (flat / "class00" / "empty.png").write_bytes(b"")  # a zero-byte image: refused, named
    with pytest.raises(DataError, match=r"empty.png.*corrupt=skip"):
        family(flat, {"train": 1.0}).images("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = family(flat, {"train": 1.0}, corrupt="skip").images("train")
    assert data.class_counts.tolist() == [4] * 6  # the five entries of class00, less one
    (flat / "class00" / "empty.png").unlink()
    (flat / "no_images").mkdir()  # an empty class folder is no class
    (flat / "Class01").mkdir()  # differs from class01 only in case: its own class
    make_image_folder(flat, {"Class01": 4}, (".png",), (8, 8))
    assert "no_images" not in family(flat, {"train": 1.0}).images("train").class_names
    assert {"Class01", "class01"} <= set(family(flat, {"train": 1.0}).images("train").class_names)
    (flat / "short.csv").write_text("filename,label\n000.png\n")  # a row without its label
    with pytest.raises(DataError, match=r"short.csv has rows that are not filename,label"):
        family(flat, {"test": "short.csv"}).images("test")
    (flat / "unknown.txt").write_text("class00\nowls\n")  # a class the folder does not have
    with pytest.raises(DataError, match=r"unknown.txt names 1 class\(es\) that .* owls"):
        family(flat, {"train": "unknown.txt"}).images("train")
    weird = os.fsencode(flat) + b"/caf\xe9"  # a non-UTF-8 class name, through the cache twice
    os.mkdir(weird)
    for i in range(2):
        os.link(flat / "class02" / f"{i:03d}.png", weird + f"/\xff{i}.png".encode("latin1"))
    names = [family(flat, {"train": 1.0}, tmp_path / "cache").images("train").class_names
             for _ in range(2)]
    assert names[0] == names[1] and "caf\udce9" in names[0]
    with pytest.raises(DataError, match=re.escape(f"{flat / 'train.txt'}") + " is a file"):
        (flat / "train.txt").write_text("x")
        family(flat / "train.txt", {"train": 1.0}).images("train")
