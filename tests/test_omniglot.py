"""Omniglot: preprocessing, split selection, cache, bad archives; real data when available."""

from __future__ import annotations

import io
import logging
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import data as data_fixtures
from helpers.data import (
    FAKE_IMAGES_PER_CHARACTER,
    draw_character,
    md5_bytes,
    tree,
    write_archive,
    zip_with_members,
)
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from sharebone.data import omniglot
from sharebone.data.archives import (
    ArchiveSpec,
    ChecksumError,
    CorruptArchiveError,
    DataError,
    DataNotFoundError,
    UnsafeArchiveError,
)
from sharebone.data.images import ImageSet
from sharebone.data.omniglot import (
    OMNIGLOT_ARCHIVES,
    cache_path,
    load_image,
    load_split,
)

fake_omniglot = data_fixtures.fake_omniglot
fake_omniglot_mirror = data_fixtures.fake_omniglot_mirror
shared_data_dir = data_fixtures.shared_data_dir

BOTH = ["fake_background", "fake_evaluation"]
# Characters in load order: first archive's alphabets sorted, then the second's new ones.
FAKE_CHARACTERS = (
    [f"Alpha_(test)/character{i:02d}" for i in (1, 2, 3)]
    + [f"Greek/character{i:02d}" for i in (1, 2)]
    + [f"Zeta/character{i:02d}" for i in (1, 2, 3)]
)


def load(fake, spec, **kwargs):
    return load_split(spec, fake.data_dir, fake.cache_dir, archives=fake.archives, **kwargs)


# ----------------------------------------------------------------------------------- registry


def test_official_archives_have_the_published_md5s_and_urls():
    expected = {
        "images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
        "images_background_small1": "e704a628b5459e08445c13499850abc4",
        "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
    }
    assert {name: spec.md5 for name, spec in OMNIGLOT_ARCHIVES.items()} == expected
    for name, spec in OMNIGLOT_ARCHIVES.items():
        assert spec.filename == f"{name}.zip"
        assert spec.url == (
            f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
        )


# --------------------------------------------------------------------------------- load_image


def _png(mode: str, size: tuple[int, int], background, stroke) -> bytes:
    img = Image.new(mode, size, background)
    ImageDraw.Draw(img).rectangle([size[0] // 4, 0, size[0] // 2, size[1] - 1], fill=stroke)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_inverts_only_when_asked():
    plain = load_image(draw_character("x"), image_size=28)
    assert plain[0, 0, 0] == 255 and plain.min() == 0  # as drawn: dark strokes on white
    image = load_image(draw_character("x"), image_size=28, invert=True)  # Omniglot's setting
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert image[0, 0, 0] == 0 and image.max() == 255  # background dark, strokes bright
    assert (image > 127).float().mean() < 0.5


def test_load_image_from_path_matches_bytes(tmp_path):
    data = draw_character("y")
    (tmp_path / "y.png").write_bytes(data)
    assert torch.equal(load_image(tmp_path / "y.png", 20), load_image(data, 20))
    assert torch.equal(load_image(str(tmp_path / "y.png"), 20), load_image(data, 20))


def test_load_image_channels_and_no_invert():
    data = _png("RGB", (60, 40), (255, 255, 255), (0, 0, 0))
    rgb = load_image(data, 32, channels=3)
    assert rgb.shape == (3, 32, 32)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert torch.equal(load_image(data, 32), 255 - load_image(data, 32, invert=True))
    with pytest.raises(ValueError, match="channels"):
        load_image(data, 32, channels=2)


def test_load_image_transparent_background_counts_as_white():
    data = _png("RGBA", (50, 50), (0, 0, 0, 0), (0, 0, 0, 255))
    image = load_image(data, 50, invert=True)
    assert image[0, 0, 0] == 0 and image[0, 10, 25] == 255


def test_load_image_rejects_undecodable_input(tmp_path):
    with pytest.raises(DataError, match="Cannot decode image bytes"):
        load_image(b"not an image", 28)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png", 28)


# ----------------------------------------------------------------------------------- ImageSet


def test_image_set_validates_its_invariants():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    good = ImageSet(images, torch.tensor([0, 0, 1, 1]), ["a", "b"])
    assert good.n_classes == 2 and len(good) == 4
    assert good.class_counts.tolist() == [2, 2] and good.class_offsets.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="sorted"):
        ImageSet(images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="span"):
        ImageSet(images, torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one"):
        ImageSet(images, torch.tensor([0, 0, 2, 2]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images.float(), torch.tensor([0, 0, 1, 1]), ["a", "b"])


# ------------------------------------------------------------------------------- split (fake)


def test_load_split_merges_archives_and_deduplicates_characters(fake_omniglot):
    split = load(fake_omniglot, {"archives": BOTH})
    n = len(FAKE_CHARACTERS)  # Greek is in both archives but counted once
    assert split.class_names == FAKE_CHARACTERS
    assert split.images.shape == (n * FAKE_IMAGES_PER_CHARACTER, 1, 28, 28)
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert split.class_counts.tolist() == [FAKE_IMAGES_PER_CHARACTER] * n
    assert torch.equal(split.labels, torch.arange(n).repeat_interleave(FAKE_IMAGES_PER_CHARACTER))


def test_bulk_decoding_equals_load_image(fake_omniglot):
    split = load(fake_omniglot, {"archives": ["fake_evaluation"]}, image_size=21)
    # class 0 of fake_evaluation is Greek/character01; its drawings are 1001_01.png, 1001_02.png..
    for d in range(FAKE_IMAGES_PER_CHARACTER):
        expected = load_image(draw_character(f"Greek/1/{d + 1}"), 21, invert=True)
        assert torch.equal(split.images[d], expected)
    assert split.images.shape[-2:] == (21, 21)


def test_load_split_keeps_or_excludes_alphabets(fake_omniglot):
    kept = load(fake_omniglot, {"archives": BOTH, "alphabets": ["Zeta", "Greek"]})
    assert kept.class_names == FAKE_CHARACTERS[3:]
    dropped = load(fake_omniglot, {"archives": BOTH, "exclude_alphabets": ["Greek"]})
    assert dropped.class_names == FAKE_CHARACTERS[:3] + FAKE_CHARACTERS[5:]


def test_load_split_character_slices_partition_the_characters(fake_omniglot):
    full = load(fake_omniglot, {"archives": BOTH})
    head = load(fake_omniglot, {"archives": BOTH, "characters": [0, 5]})
    tail = load(fake_omniglot, {"archives": BOTH, "characters": [5, None]})
    assert head.class_names == FAKE_CHARACTERS[:5] and tail.class_names == FAKE_CHARACTERS[5:]
    assert torch.equal(torch.cat([head.images, tail.images]), full.images)
    assert tail.labels.min() == 0  # labels are renumbered from 0 in every split


def test_load_split_rotations_are_classes_of_their_own(fake_omniglot):
    plain = load(fake_omniglot, {"archives": BOTH})
    rotated = load(fake_omniglot, {"archives": BOTH, "rotations": [0, 90, 180, 270]})
    k = FAKE_IMAGES_PER_CHARACTER
    assert rotated.n_classes == 4 * plain.n_classes
    assert rotated.class_names[:4] == [
        FAKE_CHARACTERS[0],
        f"{FAKE_CHARACTERS[0]}/rot90",
        f"{FAKE_CHARACTERS[0]}/rot180",
        f"{FAKE_CHARACTERS[0]}/rot270",
    ]
    assert rotated.class_counts.tolist() == [k] * rotated.n_classes
    for c in range(plain.n_classes):
        original = plain.images[c * k : (c + 1) * k]
        for r in range(4):
            block = rotated.images[rotated.labels == 4 * c + r]
            assert torch.equal(block, torch.rot90(original, r, dims=(2, 3)))


def test_omniglot_tasks_augment_only_the_splits_named(tmp_path):
    from sharebone.data.augment import AUGMENT_KEYS
    from sharebone.data.tasks import OmniglotTasks

    splits = {"train": {"archives": ["images_background_small1"]},
              "val": {"archives": ["images_background_small2"]}}
    affine = {"random_affine": {"degrees": 10, "scale": [0.9, 1.1]}}
    family = OmniglotTasks(splits, data_dir=str(tmp_path), augment={"train": affine})
    assert family.input_transform("train", 0).augment["random_affine"]["degrees"] == 10
    assert family.input_transform("val", 0) is None  # scored on the drawings as they are
    assert "random_affine" in AUGMENT_KEYS
    with pytest.raises(ValueError, match=r"augment names split\(s\) \['tain'\]"):
        OmniglotTasks(splits, data_dir=str(tmp_path), augment={"tain": affine})
    assert list(tmp_path.iterdir()) == []  # refused or not, nothing was read or written


def test_load_split_accepts_a_hydra_config(fake_omniglot):
    spec = OmegaConf.create({"archives": BOTH, "characters": [0, 2], "rotations": [0, 180]})
    split = load(fake_omniglot, spec)
    assert split.class_names == [
        FAKE_CHARACTERS[0],
        f"{FAKE_CHARACTERS[0]}/rot180",
        FAKE_CHARACTERS[1],
        f"{FAKE_CHARACTERS[1]}/rot180",
    ]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"archives": BOTH, "alphabet": ["Greek"]}, r"Unknown split key.*'alphabet'.*'alphabets'"),
        ({"alphabets": ["Greek"]}, r"needs 'archives'.*fake_background"),
        ({"archives": ["images_background"]}, r"Unknown Omniglot archive.*fake_evaluation"),
        ({"archives": BOTH, "alphabets": ["Klingon"]}, r"Klingon.*valid alphabets.*'Zeta'"),
        ({"archives": BOTH, "exclude_alphabets": ["greek"]}, r"greek.*valid alphabets.*'Greek'"),
        ({"archives": BOTH, "rotations": [45]}, r"rotations.*\[0, 90, 180, 270\]"),
        ({"archives": BOTH, "rotations": [90, 90]}, r"distinct"),
        ({"archives": BOTH, "characters": [0, 1, 2]}, r"\[start, stop\]"),
        ({"archives": BOTH, "characters": [100, None]}, r"selects no characters"),
        ("not a mapping", r"must be a mapping"),
    ],
)
def test_load_split_rejects_bad_specs_with_the_valid_choices(fake_omniglot, spec, error):
    with pytest.raises(DataError, match=error):
        load(fake_omniglot, spec)


def test_load_split_rejects_a_bad_image_size(fake_omniglot):
    with pytest.raises(DataError, match="image_size"):
        load(fake_omniglot, {"archives": BOTH}, image_size=0)


# -------------------------------------------------------------------------------------- cache


def test_second_load_is_served_from_the_cache(fake_omniglot, monkeypatch):
    first = load(fake_omniglot, {"archives": BOTH})
    for spec in fake_omniglot.archives.values():
        assert cache_path(spec, fake_omniglot.cache_dir, 28).is_file()
    # No archive and no decoding needed any more.
    for path in fake_omniglot.archive_dir.iterdir():
        path.rename(path.with_suffix(".moved"))

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(omniglot, "decode_archive", fail)
    second = load(fake_omniglot, {"archives": BOTH}, download=False)
    assert torch.equal(first.images, second.images) and first.class_names == second.class_names


def test_omniglot_cache_key_and_drawings_stay_as_they_were(fake_omniglot):
    # load_image's default no longer inverts; Omniglot's decoding passes invert=True itself, so
    # caches written before are still valid: same key (md5, size, format v1), same pixels.
    spec = fake_omniglot.archives["fake_evaluation"]
    path = cache_path(spec, fake_omniglot.cache_dir, 28)
    assert path.name == f"fake_evaluation-{spec.md5}-28px-v1.pt"
    split = load(fake_omniglot, {"archives": ["fake_evaluation"]})
    drawing = load_image(draw_character("Greek/1/1"), 28)  # as drawn: dark strokes on white
    assert torch.equal(split.images[0], 255 - drawing)
    assert torch.equal(torch.load(path, weights_only=True)["images"][0], 255 - drawing)


def test_cache_is_keyed_by_image_size(fake_omniglot):
    assert load(fake_omniglot, {"archives": BOTH}, image_size=14).images.shape[-1] == 14
    assert load(fake_omniglot, {"archives": BOTH}, image_size=28).images.shape[-1] == 28
    assert len(tree(fake_omniglot.cache_dir)) == 4


def _valid_cache_bytes(fake) -> bytes:
    spec = fake.archives["fake_background"]
    load(fake, {"archives": ["fake_background"]})
    return cache_path(spec, fake.cache_dir, 28).read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: b"garbage" * 10,
        lambda good: good[: len(good) // 2],
        lambda good: b"",
        "wrong_content",
    ],
    ids=["garbage", "truncated", "empty", "wrong_content"],
)
def test_a_corrupt_cache_file_is_removed_and_rebuilt(fake_omniglot, caplog, damage):
    spec = fake_omniglot.archives["fake_background"]
    good = _valid_cache_bytes(fake_omniglot)
    path = cache_path(spec, fake_omniglot.cache_dir, 28)
    expected = load(fake_omniglot, {"archives": ["fake_background"]})
    if damage == "wrong_content":
        torch.save({"format": "sharebone.omniglot.v1", "md5": spec.md5, "images": 1}, path)
    else:
        path.write_bytes(damage(good))
    with caplog.at_level(logging.WARNING, logger="sharebone.data.omniglot"):
        rebuilt = load(fake_omniglot, {"archives": ["fake_background"]})
    assert "corrupt or stale" in caplog.text
    assert torch.equal(rebuilt.images, expected.images)
    assert path.read_bytes() == good
    assert tree(fake_omniglot.cache_dir) == [str(path.relative_to(fake_omniglot.cache_dir))]


def test_no_cache_dir_means_no_cache(fake_omniglot, tmp_path):
    before = tree(tmp_path)
    split = load_split(
        {"archives": BOTH}, fake_omniglot.data_dir, None, archives=fake_omniglot.archives
    )
    assert split.n_classes == len(FAKE_CHARACTERS)
    assert tree(tmp_path) == before


def test_unwritable_cache_dir_is_not_fatal(fake_omniglot, caplog):
    fake_omniglot.cache_dir.write_bytes(b"a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="sharebone.data.omniglot"):
        split = load(fake_omniglot, {"archives": BOTH})
    assert split.n_classes == len(FAKE_CHARACTERS)
    assert "Cannot write the cache file" in caplog.text


# ---------------------------------------------------------------------- missing or bad archives


def test_missing_archives_are_downloaded_from_the_mirror(fake_omniglot_mirror):
    fake = fake_omniglot_mirror
    assert not fake.archive_dir.exists()
    split = load(fake, {"archives": BOTH})
    assert split.n_classes == len(FAKE_CHARACTERS)
    assert tree(fake.archive_dir) == ["fake_background.zip", "fake_evaluation.zip"]


def test_missing_archive_with_download_disabled(fake_omniglot_mirror):
    fake = fake_omniglot_mirror
    with pytest.raises(DataNotFoundError) as info:
        load(fake, {"archives": BOTH}, download=False)
    message = str(info.value)
    assert "fake_background.zip" in message and str(fake.archive_dir) in message
    assert "data_dir=" in message and "SHAREBONE_DATA_DIR" in message
    assert fake.archives["fake_background"].url in message
    assert tree(fake.data_dir) == [] and tree(fake.cache_dir) == []


def test_missing_archive_with_failing_url(fake_omniglot_mirror):
    fake = fake_omniglot_mirror
    for path in fake.mirror.iterdir():
        path.unlink()
    with pytest.raises(DataNotFoundError, match="download failed"):
        load(fake, {"archives": ["fake_background"]})
    assert tree(fake.data_dir) == [] and tree(fake.cache_dir) == []


def test_local_archive_with_wrong_md5_is_kept_and_reported(fake_omniglot):
    path = fake_omniglot.archive_dir / "fake_background.zip"
    original = path.read_bytes()
    path.write_bytes(original + b"extra")
    with pytest.raises(ChecksumError) as info:
        load(fake_omniglot, {"archives": BOTH})
    message = str(info.value)
    assert str(path) in message and fake_omniglot.archives["fake_background"].md5 in message
    assert md5_bytes(original + b"extra") in message and "delete it" in message
    assert path.read_bytes() == original + b"extra"  # not deleted by us
    assert tree(fake_omniglot.cache_dir) == []


def _single_archive(tmp_path: Path, data: bytes) -> tuple[Path, Path, dict[str, ArchiveSpec]]:
    """An archive installed in data/omniglot whose spec md5 matches it, whatever it holds."""
    data_dir = tmp_path / "data"
    spec = write_archive(data_dir / "omniglot", "odd", data)
    return data_dir, tmp_path / "cache", {"odd": spec}


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png"])
def test_archive_escaping_the_target_is_refused(tmp_path, member):
    png = draw_character("ok")
    data = zip_with_members({"odd/Greek/character01/a_01.png": png, member: png})
    data_dir, cache_dir, registry = _single_archive(tmp_path, data)
    with pytest.raises(UnsafeArchiveError, match=repr(member)):
        load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)
    assert tree(cache_dir) == [] and tree(data_dir) == ["omniglot/odd.zip"]


def test_truncated_archive_is_corrupt(tmp_path):
    data = data_fixtures.omniglot_zip_bytes("odd", {"Greek": 2})
    data_dir, cache_dir, registry = _single_archive(tmp_path, data[: len(data) - 100])
    with pytest.raises(CorruptArchiveError, match="odd.zip.*truncated or corrupt"):
        load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)
    assert tree(cache_dir) == []


def test_undecodable_png_in_archive_is_corrupt(tmp_path):
    data = zip_with_members({"odd/Greek/character01/a_01.png": b"not a png"})
    data_dir, cache_dir, registry = _single_archive(tmp_path, data)
    with pytest.raises(CorruptArchiveError, match="a_01.png"):
        load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)
    assert tree(cache_dir) == []


def test_archive_with_another_layout_is_refused(tmp_path):
    data = zip_with_members({"odd/character01/a_01.png": draw_character("x")})
    data_dir, cache_dir, registry = _single_archive(tmp_path, data)
    with pytest.raises(CorruptArchiveError, match="<archive>/<alphabet>/<character>"):
        load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)


def test_macos_metadata_members_are_ignored(tmp_path):
    png = draw_character("x")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("odd/Greek/character01/a_01.png", png)
        zf.writestr("__MACOSX/odd/Greek/character01/._a_01.png", b"resource fork")
    data_dir, cache_dir, registry = _single_archive(tmp_path, buffer.getvalue())
    split = load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)
    assert split.class_names == ["Greek/character01"] and len(split) == 1


# ---------------------------------------------------------------------------------- real data

SMALL = ["images_background_small1", "images_background_small2"]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.mark.shared_data
def test_real_archives_match_the_readme_md5s(shared_data_dir):
    from sharebone.data.archives import md5sum

    for name in SMALL:
        spec = OMNIGLOT_ARCHIVES[name]
        assert md5sum(shared_data_dir / "omniglot" / spec.filename) == spec.md5


@pytest.mark.shared_data
def test_real_small_archives_give_242_characters_of_20_drawings(shared_data_dir, real_cache):
    start = time.perf_counter()
    split = load_split({"archives": SMALL}, shared_data_dir, real_cache, download=False)
    cold = time.perf_counter() - start
    assert split.n_classes == 242 and len(set(split.class_names)) == 242
    assert split.class_counts.tolist() == [20] * 242
    assert split.images.shape == (242 * 20, 1, 28, 28) and split.images.dtype == torch.uint8
    alphabets = {name.split("/")[0] for name in split.class_names}
    assert alphabets == {
        "Balinese", "Early_Aramaic", "Greek", "Korean", "Latin",
        "Japanese_(katakana)", "Sanskrit", "Tagalog",
    }  # fmt: skip
    # Strokes bright on a dark background: corners are (almost always) 0, most pixels are dark,
    # and every drawing has bright stroke pixels (thin strokes average below 255 when downsized).
    corners = split.images[:, 0][:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).float().mean() > 0.99
    assert (split.images > 127).float().mean() < 0.15
    assert split.images.amax(dim=(1, 2, 3)).min() > 127 and split.images.max() == 255

    start = time.perf_counter()
    again = load_split({"archives": SMALL}, shared_data_dir, real_cache, download=False)
    cached = time.perf_counter() - start
    assert torch.equal(again.images, split.images)
    assert cached < 1.0, f"cached load took {cached:.2f}s (cold {cold:.2f}s)"


@pytest.mark.shared_data
def test_real_shared_alphabets_are_the_same_drawings(shared_data_dir, real_cache):
    spec = {"alphabets": ["Greek", "Latin"]}
    one = load_split({"archives": SMALL[:1], **spec}, shared_data_dir, real_cache, download=False)
    two = load_split({"archives": SMALL[1:], **spec}, shared_data_dir, real_cache, download=False)
    assert one.class_names == two.class_names and one.n_classes == 24 + 26
    assert torch.equal(one.images, two.images)


@pytest.mark.shared_data
def test_real_rotated_split(shared_data_dir, real_cache):
    spec = {"archives": SMALL, "exclude_alphabets": ["Korean"], "rotations": [0, 90, 180, 270]}
    plain = load_split({**spec, "rotations": [0]}, shared_data_dir, real_cache, download=False)
    rotated = load_split(spec, shared_data_dir, real_cache, download=False)
    assert rotated.n_classes == 4 * plain.n_classes
    assert torch.equal(
        rotated.images[rotated.labels == 1], torch.rot90(plain.images[:20], 1, (2, 3))
    )
