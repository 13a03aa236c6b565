"""Test helpers for the data layer: tiny generated Omniglot-layout archives and the real data path.

Helpers are plain functions; the fixtures at the bottom wrap them. A test module uses a fixture
by binding it at module level (``fake_omniglot = helpers.data.fake_omniglot``), or
``tests/conftest.py`` can register them all with ``from helpers.data import *``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sharebone.data.archives import ArchiveSpec

#: What ``from helpers.data import *`` (e.g. in conftest.py) registers: the fixtures only.
__all__ = ["fake_omniglot", "fake_omniglot_mirror", "shared_data_dir"]

#: Where the real data lives: ``../shared/data`` from the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: Two small archives sharing the "Greek" alphabet (same drawings in both, as in the real small
#: sets). Archive name -> alphabet -> number of characters.
FAKE_LAYOUT: dict[str, dict[str, int]] = {
    "fake_background": {"Greek": 2, "Alpha_(test)": 3},
    "fake_evaluation": {"Zeta": 3, "Greek": 2},
}
FAKE_IMAGES_PER_CHARACTER = 4


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def draw_character(key: str, size: int = 105) -> bytes:
    """A deterministic 1-bit PNG for ``key``: black strokes on white, like Omniglot."""
    rng = random.Random(zlib.crc32(key.encode()))
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        points = [(rng.randrange(10, size - 10), rng.randrange(10, size - 10)) for _ in range(4)]
        draw.line(points, fill=0, width=4)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_zip_bytes(
    top: str, alphabets: dict[str, int], n_images: int = FAKE_IMAGES_PER_CHARACTER
) -> bytes:
    """An Omniglot-layout zip: ``top/<alphabet>/characterNN/<id>_<drawer>.png``.

    A drawing depends only on (alphabet, character, drawer), so an alphabet present in two
    archives has the same drawings in both.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")
        for alphabet, n_characters in alphabets.items():
            zf.writestr(f"{top}/{alphabet}/", b"")
            for c in range(1, n_characters + 1):
                folder = f"{top}/{alphabet}/character{c:02d}"
                zf.writestr(f"{folder}/", b"")
                for d in range(1, n_images + 1):
                    png = draw_character(f"{alphabet}/{c}/{d}")
                    zf.writestr(f"{folder}/{1000 + c:04d}_{d:02d}.png", png)
    return buffer.getvalue()


def write_archive(folder: Path, name: str, data: bytes) -> ArchiveSpec:
    """Write ``data`` as ``folder/<name>.zip``; its spec has the right md5 and a file:// URL."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.zip"
    path.write_bytes(data)
    return ArchiveSpec(name=name, url=path.as_uri(), md5=md5_bytes(data), filename=path.name)


def zip_with_members(members: dict[str, bytes]) -> bytes:
    """A zip holding exactly ``members`` (names kept verbatim, even unsafe ones)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def tree(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, sorted); [] if the folder does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@dataclass
class FakeOmniglot:
    """Generated archives served from ``mirror`` (file:// URLs) and copied to ``data_dir``."""

    mirror: Path
    data_dir: Path
    cache_dir: Path
    archives: dict[str, ArchiveSpec]

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "omniglot"


def make_fake_omniglot(root: Path, install: bool = True) -> FakeOmniglot:
    """Build the :data:`FAKE_LAYOUT` archives under ``root``.

    With ``install`` the archives are also placed in ``data_dir/omniglot`` (else that folder is
    absent and a load must download them from the mirror).
    """
    mirror = root / "mirror"
    archives = {
        name: write_archive(mirror, name, omniglot_zip_bytes(name, layout))
        for name, layout in FAKE_LAYOUT.items()
    }
    fake = FakeOmniglot(mirror, root / "data", root / "cache", archives)
    if install:
        fake.archive_dir.mkdir(parents=True)
        for spec in archives.values():
            (fake.archive_dir / spec.filename).write_bytes((mirror / spec.filename).read_bytes())
    return fake


# ------------------------------------------------------------------- natural-image datasets

#: sharebone's shipped split files (tasks/splits/<benchmark>/<split>.txt).
SPLITS_DIR = REPO_ROOT / "tasks" / "splits"


def split_lines(benchmark: str, split: str) -> list[str]:
    return (SPLITS_DIR / benchmark / f"{split}.txt").read_text().split()


def photo(key: str, size: tuple[int, int] = (20, 16)) -> Image.Image:
    """A deterministic RGB "photo" for ``key`` = ``<class>/<index>``: the class sets the
    colour, the index the noise, so classes differ and images of a class resemble each other."""
    cls = key.rsplit("/", 1)[0]
    base = np.frombuffer(hashlib.md5(cls.encode()).digest()[:3], np.uint8).astype(np.int64)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    noise = rng.integers(-40, 40, (size[1], size[0], 3))
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def make_image_folder(root: Path, classes: dict[str, int], suffixes: tuple[str, ...] = (
        ".png", ".jpg"), size: tuple[int, int] = (20, 16)) -> Path:
    """``root/<class>/NNN<suffix>`` (a class may be ``<group>/<class>``), ``classes[name]``
    images each, suffixes taken in turn."""
    for name, n in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            photo(f"{name}/{i}", size).save(folder / f"{i:03d}{suffixes[i % len(suffixes)]}")
    return root


def cifar_classes() -> tuple[list[str], list[str], dict[str, str]]:
    """CIFAR-100's fine and coarse label names (sorted, as its ``meta`` lists them) and each
    fine class's superclass, from the shipped FC100 split files (every class, by superclass)."""
    pairs = [line.split("/") for s in ("train", "val", "test") for line in split_lines("fc100", s)]
    return (sorted(f for _, f in pairs), sorted({c for c, _ in pairs}),
            {f: c for c, f in pairs})


def cifar100_tar_bytes(per_class: int = 3, members: dict[str, bytes] | None = None) -> bytes:
    """A ``cifar-100-python.tar.gz`` laid out as the real one (``cifar-100-python/{train, test,
    meta}``, Python-2-style pickles with bytes keys), ``per_class`` images of each of the 100
    classes (the last in ``test``); ``members`` adds or replaces members."""
    fine, coarse, coarse_of = cifar_classes()

    def batch(rows: list[tuple[int, int]]) -> bytes:
        data = np.stack([np.asarray(photo(f"{fine[c]}/{i}", (32, 32))).transpose(2, 0, 1)
                         .reshape(-1) for c, i in rows])
        return pickle.dumps({
            b"batch_label": b"batch", b"filenames": [f"{c}_{i}.png".encode() for c, i in rows],
            b"fine_labels": [c for c, _ in rows],
            b"coarse_labels": [coarse.index(coarse_of[fine[c]]) for c, _ in rows],
            b"data": data}, protocol=2)

    train = [(c, i) for c in range(100) for i in range(per_class - 1)]
    test = [(c, per_class - 1) for c in range(100)]
    meta = pickle.dumps({b"fine_label_names": [n.encode() for n in fine],
                         b"coarse_label_names": [n.encode() for n in coarse]}, protocol=2)
    content = {"cifar-100-python/train": batch(train), "cifar-100-python/test": batch(test),
               "cifar-100-python/meta": meta, "cifar-100-python/file.txt~": b"",
               **(members or {})}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def mini_imagenet_pickle(path: Path, wnids: list[str], per_class: int = 3,
                         side: int = 84) -> Path:
    """``mini-imagenet-cache-<split>.pkl`` as published: ``image_data`` uint8 [N, 84, 84, 3]
    and ``class_dict`` wnid -> list of row indices."""
    images, class_dict = [], {}
    for wnid in wnids:
        class_dict[wnid] = list(range(len(images), len(images) + per_class))
        images += [np.asarray(photo(f"{wnid}/{i}", (side, side))) for i in range(per_class)]
    path.write_bytes(pickle.dumps({"image_data": np.stack(images), "class_dict": class_dict},
                                  protocol=4))
    return path


def require_shared_data() -> Path:
    """The real data folder, or skip the test with the reason."""
    folder = SHARED_DATA / "omniglot"
    if not (folder / "images_background_small1.zip").exists():
        pytest.skip(f"real Omniglot archives not found in {folder} (../shared/data from the repo)")
    return SHARED_DATA


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> FakeOmniglot:
    """Fake Omniglot archives installed in ``data_dir/omniglot``; empty cache."""
    return make_fake_omniglot(tmp_path)


@pytest.fixture
def fake_omniglot_mirror(tmp_path: Path) -> FakeOmniglot:
    """Fake Omniglot archives only on the file:// mirror; ``data_dir`` is empty."""
    return make_fake_omniglot(tmp_path, install=False)


@pytest.fixture
def shared_data_dir() -> Path:
    """``../shared/data`` holding the real Omniglot small archives; skips when absent."""
    return require_shared_data()


def draw_shape(path: Path, shape: str, shift: int = 0) -> None:
    """A 105x105 grayscale drawing: a vertical bar or a ring (``shift`` moves it right)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", (105, 105), 255)
    d = ImageDraw.Draw(img)
    if shape == "bar":
        d.rectangle([45 + shift, 10, 60 + shift, 95], fill=0)
    else:
        d.ellipse([20 + shift, 20, 85 + shift, 85], outline=0, width=10)
    img.save(path)


#: The shipped wnid -> name table of tieredImageNet (what the release spells).
TIERED_NAMES = SPLITS_DIR / "tiered_imagenet" / "names.txt"


def tiered_names() -> dict[str, str]:
    lines = TIERED_NAMES.read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if line and not line.startswith("#"))


class Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 wrote its ``str`` (``SHORT_BINSTRING``/``BINSTRING``), so a
    pickle made here reads as the release's, which Python 2 wrote."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def python2_pickle(obj: object) -> bytes:
    """``obj`` as a Python 2 protocol-2 pickle: its strings as given in bytes, numpy under the
    module name numpy 1 had (``numpy.core.multiarray``)."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def tiered_release(root: Path, split: str, classes: list[tuple[str, str]], per_class: int = 2,
                   python2: bool = True) -> list[bytes]:
    """``<split>_images_png.pkl`` and ``<split>_labels.pkl`` in the layout of Ren et al.'s
    release, for ``classes`` = ``[(category wnid, class wnid)]``: a list of uint8 arrays of PNG
    bytes (``cv2.imencode``'s [n, 1]), and the labels dict with the release's key names, class
    and category named by their words (categories cut at 46 characters, as the release has
    them), classes interleaved. Returns the PNG bytes, in order."""
    names = tiered_names()
    general: list[str] = []
    specific, label_general, label_specific, pngs = [], [], [], []
    for i in range(per_class):
        for c, (category, wnid) in enumerate(classes):
            name = names[category][:46]
            if name not in general:
                general.append(name)
            buffer = io.BytesIO()
            photo(f"{wnid}/{i}", (84, 84)).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
            label_specific.append(c)
            label_general.append(general.index(name))
    specific = [names[w] for _, w in classes]
    text = (lambda s: s.encode("latin1")) if python2 else str
    labels = {text("label_specific"): np.array(label_specific, np.int32),
              text("label_general"): np.array(label_general, np.int32),
              text("label_specific_str"): [text(n) for n in specific],
              text("label_general_str"): [text(n) for n in general]}
    images = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in pngs]
    root.mkdir(parents=True, exist_ok=True)
    dump = python2_pickle if python2 else (lambda o: pickle.dumps(o, protocol=4))
    (root / f"{split}_images_png.pkl").write_bytes(dump(images))
    (root / f"{split}_labels.pkl").write_bytes(dump(labels))
    return pngs
