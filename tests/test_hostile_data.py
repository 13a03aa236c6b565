"""Hostile data and files: archives, images, folders, caches and paths that try to break a run.

Issue 9, data & files items. Each test states the behaviour it checks; a hostile input gives a
clear error naming the file and the fix (or a safe fallback), loses nothing of the user's, leaves
no half-written file, and never makes sharebone read without bound or hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import data as data_fixtures
from helpers.configs import compose_train
from helpers.crafted import pickle_bomb
from helpers.data import draw_character, tree, write_archive, zip_with_members
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from sharebone.data.archives import (
    ArchiveSpec,
    CorruptArchiveError,
    DataError,
    DataNotFoundError,
    SafeZip,
    UnsafeArchiveError,
    ensure_archives,
)
from sharebone.data.omniglot import cache_path, load_image, load_split
from sharebone.evaluation.folder import EpisodeFolderError, load_episode_folder

fake_omniglot = data_fixtures.fake_omniglot
fake_omniglot_mirror = data_fixtures.fake_omniglot_mirror

BOTH = ["fake_background", "fake_evaluation"]
MiB = 1 << 20


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds}s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def peak_memory():
    """``peak[0]``: the most bytes Python held at once inside the block (tracemalloc)."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def zeros_zip(name: str, size: int) -> bytes:
    """A zip whose one deflated member is ``size`` zero bytes (a few hundred KiB on disk)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as member:
        chunk = bytes(MiB)
        for _ in range(size // MiB):
            member.write(chunk)
        member.write(bytes(size % MiB))
    return buffer.getvalue()


def patch_headers(data: bytes, *, file_size: int | None = None, flag_bits: int = 0) -> bytes:
    """Rewrite the (first) member's declared uncompressed size and/or set general-purpose flag
    bits, in both its local header and its central directory entry."""
    out = bytearray(data)
    local, central = out.index(b"PK\x03\x04"), out.index(b"PK\x01\x02")
    for offset, flags_at, size_at in ((local, 6, 22), (central, 8, 24)):
        if file_size is not None:
            struct.pack_into("<I", out, offset + size_at, file_size)
        (flags,) = struct.unpack_from("<H", out, offset + flags_at)
        struct.pack_into("<H", out, offset + flags_at, flags | flag_bits)
    return bytes(out)


def single_archive(tmp_path: Path, data: bytes) -> tuple[Path, Path, dict[str, ArchiveSpec]]:
    """``data`` installed as data/omniglot/odd.zip with a matching spec, and a cache folder."""
    data_dir = tmp_path / "data"
    spec = write_archive(data_dir / "omniglot", "odd", data)
    return data_dir, tmp_path / "cache", {"odd": spec}


def png(img: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def drawing(mode: str = "L", size: int = 40) -> Image.Image:
    """A dark bar on a light background, off-centre so that rotations differ."""
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).rectangle([2, 2, size - 3, size // 4], fill=0)
    return img.convert(mode)


def put(path: Path, img: Image.Image | None = None) -> Path:
    """Save ``img`` (default: :func:`drawing`) at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (drawing() if img is None else img).save(path)
    return path


def make_episode(root: Path) -> Path:
    """support/{bar,ring}/{0,1}.png and query/{bar,ring}/q.png."""
    for cls, angle in (("bar", 0), ("ring", 90)):
        for i in range(2):
            put(root / "support" / cls / f"{i}.png", drawing().rotate(angle + 3 * i))
        put(root / "query" / cls / "q.png", drawing().rotate(angle))
    return root


# ---------------------------------------------------------------- 1. zip members have a size cap


def test_zip_member_declaring_more_than_the_cap_is_refused_before_reading(tmp_path):
    from sharebone.data.archives import MAX_MEMBER_BYTES

    path = tmp_path / "bomb.zip"
    path.write_bytes(zeros_zip("top/a.png", MAX_MEMBER_BYTES + MiB))
    assert path.stat().st_size < 2 * MiB  # tiny on disk, huge once inflated
    with SafeZip(path) as archive, peak_memory() as peak:
        with pytest.raises(UnsafeArchiveError) as info:
            archive.read("top/a.png")
    message = str(info.value)
    assert str(path) in message and "'top/a.png'" in message and "MAX_MEMBER_BYTES" in message
    assert peak[0] < 8 * MiB


def test_zip_member_whose_header_understates_its_size_is_read_in_bounded_memory(tmp_path):
    # The headers say 1000 bytes; the deflated stream inflates to 80 MiB. zipfile.read
    # inflates it all before noticing; the read must stop near the declared size instead.
    path = tmp_path / "liar.zip"
    path.write_bytes(patch_headers(zeros_zip("top/a.png", 80 * MiB), file_size=1000))
    with SafeZip(path) as archive, peak_memory() as peak:
        with pytest.raises(CorruptArchiveError, match="'top/a.png'"):
            archive.read("top/a.png")
    assert peak[0] < 8 * MiB


# ------------------------------------------------------------- 2. archives that are not files


def test_archive_path_that_is_a_directory_is_refused_naming_it(tmp_path):
    from sharebone.data.archives import NotAFileError

    spec = ArchiveSpec("x", "https://example.invalid/x.zip", "0" * 32, "x.zip")
    (tmp_path / "x.zip").mkdir()
    with pytest.raises(NotAFileError, match=r"x\.zip is a directory, not a file"):
        ensure_archives([spec], tmp_path)
    with pytest.raises(NotAFileError, match=r"x\.zip is a directory, not a file"):
        SafeZip(tmp_path / "x.zip")
    assert (tmp_path / "x.zip").is_dir()


@pytest.mark.parametrize("kind", ["symlink_to_dev_zero", "fifo"])
def test_archive_that_is_a_device_or_fifo_is_refused_without_reading(tmp_path, kind):
    from sharebone.data.archives import NotAFileError

    spec = ArchiveSpec("x", "https://example.invalid/x.zip", "0" * 32, "x.zip")
    path = tmp_path / "x.zip"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with deadline(10):
        with pytest.raises(NotAFileError, match=r"x\.zip.* is a (character device|FIFO)"):
            ensure_archives([spec], tmp_path)
        with pytest.raises(NotAFileError, match=r"x\.zip.* is a (character device|FIFO)"):
            SafeZip(path)
    assert path.is_symlink() or stat.S_ISFIFO(path.stat().st_mode)  # left as it was


# ------------------------------------------------------------ 3. '${' in paths is taken literally


def test_data_dir_from_the_environment_with_interpolation_syntax_is_taken_literally(
        tmp_path, monkeypatch):
    from sharebone.run.train import ddp_job

    monkeypatch.setenv("SHAREBONE_DATA_DIR", "/tmp/a${b}")
    monkeypatch.setenv("SHAREBONE_CACHE_DIR", "/tmp/c${oc.env:HOME}\\${d}")
    cfg = compose_train(tmp_path, ["task=omniglot_small", "logger=none"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["family"]["data_dir"] == "/tmp/a${b}"
    assert resolved["task"]["family"]["cache_dir"] == "/tmp/c${oc.env:HOME}\\${d}"
    # A DDP rank runs the config rank 0 resolved and wrote: it must read the same paths back.
    with ddp_job(cfg, tmp_path):
        handed = OmegaConf.load(tmp_path / ".rank_config.yaml")
    assert OmegaConf.to_container(handed, resolve=True) == resolved


# ------------------------------------------------------------------------ 4. 16-bit grayscale


def test_16_bit_grayscale_png_keeps_its_contrast():
    pixels = np.full((40, 40), 60000, np.uint16)  # light background
    pixels[5:35, 18:22] = 1000  # a dark stroke
    data = png(Image.fromarray(pixels))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = load_image(data, 40, invert=True)[0]  # as Omniglot reads a drawing
    assert image[20, 20] >= 240 and image[0, 0] <= 30  # stroke bright, background dark
    assert torch.equal(load_image(data, 40), load_image(png(Image.fromarray(
        (pixels >> 8).astype(np.uint8))), 40))


# ---------------------------------------------------------------- 5. hidden entries are ignored


def test_hidden_entries_in_an_episode_folder_are_ignored(tmp_path):
    root = make_episode(tmp_path)
    put(root / "support" / ".ipynb_checkpoints" / "0-checkpoint.png")
    put(root / "support" / "bar" / ".hidden.png")
    put(root / "query" / ".ipynb_checkpoints" / "q-checkpoint.png")
    put(root / "query" / "._q.png")
    loaded = load_episode_folder(root, image_size=28)
    assert loaded.class_names == ["bar", "ring"]
    assert loaded.episode.support.shape[1] == 4 and loaded.episode.query.shape[1] == 2


def test_hidden_members_of_an_omniglot_archive_are_ignored(tmp_path):
    image = draw_character("x")
    data = zip_with_members({
        "odd/Greek/character01/a_01.png": image,
        "odd/Greek/character01/.a_02.png": image,
        "odd/Greek/.ipynb_checkpoints/a_01-checkpoint.png": image,
        "odd/.hidden/Greek/character01/a_01.png": image,
        "odd/.DS_Store": b"\0\0\0\1Bud1",
        "__MACOSX/odd/Greek/character01/._a_01.png": b"resource fork",
    })
    data_dir, cache_dir, registry = single_archive(tmp_path, data)
    split = load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)
    assert split.class_names == ["Greek/character01"] and len(split) == 1


# ------------------------------------------------------- 6. every missing archive in one error


def test_missing_data_error_lists_every_missing_archive_of_a_split(fake_omniglot_mirror):
    fake = fake_omniglot_mirror
    with pytest.raises(DataNotFoundError) as info:
        load_split({"archives": BOTH}, fake.data_dir, fake.cache_dir, download=False,
                   archives=fake.archives)
    message = str(info.value)
    for spec in fake.archives.values():
        assert spec.filename in message and spec.url in message
    assert str(fake.archive_dir) in message
    assert tree(fake.data_dir) == [] and tree(fake.cache_dir) == []


# --------------------------------------------------------------------------- 7. atomic_write


def test_atomic_write_replaces_the_target_only_when_the_block_completes(tmp_path):
    from sharebone.files import atomic_write

    target = tmp_path / "sub" / "results.json"
    with atomic_write(target, "w") as f:
        f.write("first")
        (tmp,) = [p for p in target.parent.iterdir()]
        assert tmp.name.startswith(".results.json.") and tmp.suffix == ".tmp"
        assert not target.exists()
    assert target.read_text() == "first" and tree(tmp_path) == ["sub/results.json"]
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "first" and tree(tmp_path) == ["sub/results.json"]


def test_atomic_write_gives_the_mode_open_would_give(tmp_path):
    from sharebone.files import atomic_write

    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a.bin") as f:
            f.write(b"x")
        with open(tmp_path / "b.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640


def test_every_atomic_writer_follows_one_temp_file_convention(tmp_path, fake_omniglot_mirror,
                                                              monkeypatch):
    from sharebone.checkpoint_io import AtomicCheckpointIO
    from sharebone.evaluation.report import write_results

    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        renames.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    fake = fake_omniglot_mirror
    load_split({"archives": ["fake_background"]}, fake.data_dir, fake.cache_dir,
               archives=fake.archives)  # a download, then a cache file
    write_results([], tmp_path / "eval")
    AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "c.ckpt")
    cache = cache_path(fake.archives["fake_background"], fake.cache_dir, 28).name
    assert [dst for _, dst in renames] == ["fake_background.zip", cache, "fewshot.json",
                                           "fewshot.csv", "c.ckpt"]
    for src, dst in renames:
        assert src.startswith(f".{dst}.") and src.endswith(".tmp"), (src, dst)


# ------------------------------------------------------------ 9. siblings found in the sweep


def test_zip_with_a_duplicate_member_name_is_corrupt(tmp_path):
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        zf.writestr("top/a.png", b"first")
        zf.writestr("top/a.png", b"second")
    path = tmp_path / "dup.zip"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CorruptArchiveError, match=r"'top/a.png' appears 2 times"):
        SafeZip(path)


def test_zip_with_an_encrypted_member_is_a_clear_error(tmp_path):
    path = tmp_path / "locked.zip"
    path.write_bytes(patch_headers(zip_with_members({"top/a.png": b"x" * 100}), flag_bits=0x1))
    with pytest.raises(CorruptArchiveError, match=r"'top/a.png' is encrypted"):
        SafeZip(path)


def test_zip_with_a_symlink_member_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("top/Greek/character01/a_01.png", draw_character("x"))
        link = zipfile.ZipInfo("top/Greek/character01/a_02.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    path = tmp_path / "link.zip"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"'top/Greek/character01/a_02.png' is a "
                                                 "symbolic link"):
        SafeZip(path)


def huge_png(width: int, height: int) -> bytes:
    """A valid, complete 1-bit PNG of ``width x height`` white pixels: a few KiB on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    row = b"\0" + b"\xff" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at open
def test_image_with_huge_dimensions_is_refused_before_decoding(tmp_path):
    # 100 M pixels: over our cap, under the 178 M where Pillow itself would refuse.
    data = huge_png(10_000, 10_000)
    assert len(data) < 100_000
    with pytest.raises(DataError, match=r"10000x10000 pixels.*larger than"):
        load_image(data, 28)
    archive = zip_with_members({"odd/Greek/character01/a_01.png": data})
    data_dir, cache_dir, registry = single_archive(tmp_path, archive)
    with pytest.raises(CorruptArchiveError, match=r"a_01.png.*10000x10000 pixels"):
        load_split({"archives": ["odd"]}, data_dir, cache_dir, archives=registry)


def test_exif_rotated_photo_is_loaded_upright():
    stored = drawing()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert not torch.equal(load_image(png(stored), 28), load_image(png(upright), 28))
    assert torch.equal(load_image(png(stored, exif=exif), 28), load_image(png(upright), 28))


def test_image_outside_a_class_folder_in_support_is_refused(tmp_path):
    root = make_episode(tmp_path)
    put(root / "support" / "stray.png")
    with pytest.raises(EpisodeFolderError, match=r"stray.png is not in a class folder.*"
                                                 r"support/<class>/"):
        load_episode_folder(root, image_size=28)


@pytest.mark.parametrize("content", [b"", b"plain text, not a picture",
                                     "truncated"], ids=["empty", "text", "truncated"])
def test_undecodable_image_in_an_episode_folder_names_the_file_and_the_fix(tmp_path, content):
    root = make_episode(tmp_path)
    bad = root / "support" / "bar" / "bad.png"
    bad.write_bytes(png(drawing())[:60] if content == "truncated" else content)
    with pytest.raises(DataError) as info:
        load_episode_folder(root, image_size=28)
    assert str(bad) in str(info.value) and "remove it" in str(info.value)


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path, fake_omniglot_mirror):
    fake = fake_omniglot_mirror
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("notes")
    with pytest.raises(DataNotFoundError, match=r"data\.txt is a file, not a folder"):
        load_split({"archives": BOTH}, not_a_folder, fake.cache_dir, archives=fake.archives)
    assert not_a_folder.read_text() == "notes"


def test_non_utf8_file_names_in_an_episode_folder_are_scored_and_printed(tmp_path, capsys):
    from sharebone.regimes import ProtoNet
    from sharebone.run.eval import score_folder

    root = make_episode(tmp_path)
    weird = os.fsencode(root / "support") + b"/caf\xe9"
    os.mkdir(weird)
    drawing().rotate(40).save(os.fsdecode(weird + b"/\xff.png"))
    os.mkdir(os.fsencode(root / "query") + b"/caf\xe9")
    drawing().rotate(40).save(os.fsdecode(os.fsencode(root / "query") + b"/caf\xe9/q\xfe.png"))
    model = ProtoNet({"name": "mlp", "in_features": 784, "hidden": []})
    summary = score_folder(model, OmegaConf.create({"episode_dir": str(root)}),
                           {"image_size": 28})
    assert summary["classes"] == ["bar", "caf\ufffd", "ring"]
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # no lone surrogates left
    assert "q\ufffd.png" in capsys.readouterr().out


def test_cache_entry_that_is_a_fifo_is_neither_read_nor_removed(fake_omniglot, caplog):
    spec = fake_omniglot.archives["fake_background"]
    path = cache_path(spec, fake_omniglot.cache_dir, 28)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with deadline(20):
        split = load_split({"archives": ["fake_background"]}, fake_omniglot.data_dir,
                           fake_omniglot.cache_dir, archives=fake_omniglot.archives)
    assert split.n_classes == 5
    assert "not a regular file" in caplog.text
    assert stat.S_ISFIFO(path.stat().st_mode)  # still there, not replaced or removed


def test_cache_file_that_runs_code_when_unpickled_is_rebuilt_not_run(fake_omniglot, tmp_path):
    spec = fake_omniglot.archives["fake_background"]
    path = cache_path(spec, fake_omniglot.cache_dir, 28)
    path.parent.mkdir(parents=True)
    victim = tmp_path / "pwned"
    pickle_bomb(path, victim)
    split = load_split({"archives": ["fake_background"]}, fake_omniglot.data_dir,
                       fake_omniglot.cache_dir, archives=fake_omniglot.archives)
    assert split.n_classes == 5 and not victim.exists()
    assert torch.load(path, weights_only=True)["md5"] == spec.md5  # rebuilt


@pytest.mark.parametrize("mode", ["P", "CMYK", "RGBA", "LA", "1", "RGB"])
def test_palette_cmyk_and_alpha_images_decode_as_the_same_drawing(mode):
    reference = load_image(png(drawing()), 28)
    image = drawing(mode)
    if mode in ("RGBA", "LA"):
        image.putalpha(255)
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    assert (load_image(buffer.getvalue(), 28).int() - reference.int()).abs().max() <= 1


def test_support_classes_of_unequal_sizes_keep_their_own_labels(tmp_path):
    root = make_episode(tmp_path)
    for i in range(2, 5):
        put(root / "support" / "bar" / f"{i}.png", drawing().rotate(i))
    loaded = load_episode_folder(root, image_size=28)
    assert loaded.episode.support_labels.tolist() == [[0, 0, 0, 0, 0, 1, 1]]
