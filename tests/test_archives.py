"""Archives: md5, atomic downloads over file:// URLs, local checks, and safe/corrupt zips."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from pathlib import Path

import pytest
from helpers import data as data_fixtures
from helpers.data import md5_bytes, tree, write_archive, zip_with_members

from sharebone.data.archives import (
    ArchiveSpec,
    ChecksumError,
    CorruptArchiveError,
    DataError,
    DataNotFoundError,
    DownloadError,
    SafeZip,
    UnsafeArchiveError,
    check_member_name,
    download,
    ensure_archives,
    md5sum,
    resolve_data_dir,
)

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # several download chunks


@pytest.fixture
def source(tmp_path: Path) -> ArchiveSpec:
    """A file to "download", served by a file:// URL from tmp_path/mirror."""
    return write_archive(tmp_path / "mirror", "payload", PAYLOAD)


def test_error_classes_share_one_base():
    for cls in (DataNotFoundError, ChecksumError, UnsafeArchiveError, CorruptArchiveError):
        assert issubclass(cls, DataError)
    assert issubclass(DataError, RuntimeError)


def test_md5sum_streams_in_chunks(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert md5sum(path, chunk_size=4096) == hashlib.md5(PAYLOAD).hexdigest() == md5sum(path)


# ------------------------------------------------------------------------------------ download


def test_download_file_url_verifies_md5_and_leaves_no_temp_file(tmp_path, source):
    dest = tmp_path / "data" / "sub" / "payload.zip"
    assert download(source.url, dest, source.md5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert tree(dest.parent) == ["payload.zip"]


def test_download_md5_mismatch_leaves_no_file_and_no_temp_file(tmp_path, source):
    dest = tmp_path / "data" / "payload.zip"
    with pytest.raises(ChecksumError) as info:
        download(source.url, dest, "0" * 32)
    message = str(info.value)
    assert source.md5 in message and "0" * 32 in message and source.url in message
    assert list(dest.parent.iterdir()) == []


def test_download_md5_mismatch_keeps_an_existing_destination(tmp_path, source):
    dest = tmp_path / "payload.zip"
    dest.write_bytes(b"previous content")
    with pytest.raises(ChecksumError):
        download(source.url, dest, "0" * 32)
    assert dest.read_bytes() == b"previous content"
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "mirror", dest])


def test_download_missing_url_raises_and_leaves_nothing(tmp_path):
    dest = tmp_path / "data" / "payload.zip"
    url = (tmp_path / "no_such_file.zip").as_uri()
    with pytest.raises(DownloadError, match="Cannot download .*no_such_file.zip"):
        download(url, dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_download_interrupted_midway_leaves_nothing(tmp_path, source, monkeypatch):
    class InterruptedResponse(io.BytesIO):
        reads = 0

        def read(self, size=-1):
            InterruptedResponse.reads += 1
            if InterruptedResponse.reads == 2:
                raise KeyboardInterrupt
            return super().read(size)

    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: InterruptedResponse(PAYLOAD)
    )
    dest = tmp_path / "data" / "payload.zip"
    with pytest.raises(KeyboardInterrupt):
        download(source.url, dest, source.md5)
    assert InterruptedResponse.reads == 2
    assert list(dest.parent.iterdir()) == []


def test_download_into_unwritable_place_is_a_download_error(tmp_path, source):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError, match="writable"):
        download(source.url, blocker / "payload.zip", source.md5)


# ----------------------------------------------------------------------------- ensure_archives


def test_ensure_archives_uses_a_verified_local_file_without_downloading(tmp_path, source):
    root = tmp_path / "data"
    root.mkdir()
    (root / source.filename).write_bytes(PAYLOAD)
    offline = ArchiveSpec(source.name, "file:///nonexistent/x.zip", source.md5, source.filename)
    assert ensure_archives([offline], root, download=True) == [root / source.filename]


def test_ensure_archives_wrong_local_md5_is_an_error_and_the_file_is_kept(tmp_path, source):
    root = tmp_path / "data"
    root.mkdir()
    bad = root / source.filename
    bad.write_bytes(PAYLOAD[:1000])
    with pytest.raises(ChecksumError) as info:
        ensure_archives([source], root)
    message = str(info.value)
    assert str(bad) in message
    assert source.md5 in message and md5_bytes(PAYLOAD[:1000]) in message
    assert "delete it" in message and source.url in message
    # sharebone never deletes a file it did not create
    assert bad.read_bytes() == PAYLOAD[:1000]
    assert list(root.iterdir()) == [bad]


def test_ensure_archives_downloads_a_missing_file(tmp_path, source):
    root = tmp_path / "data"
    (path,) = ensure_archives([source], root)
    assert path == root / source.filename
    assert md5sum(path) == source.md5
    assert tree(root) == [source.filename]


def test_ensure_archives_missing_with_download_disabled(tmp_path, source):
    root = tmp_path / "data" / "omniglot"
    with pytest.raises(DataNotFoundError) as info:
        ensure_archives([source], root, download=False)
    message = str(info.value)
    for expected in (source.filename, source.md5, source.url, str(root), "download=False"):
        assert expected in message
    assert "data_dir=" in message and "SHAREBONE_DATA_DIR" in message
    assert "<data_dir>/omniglot/" in message
    assert tree(tmp_path / "data") == []


def test_ensure_archives_missing_with_failing_url(tmp_path):
    root = tmp_path / "data"
    spec = ArchiveSpec("x", (tmp_path / "gone.zip").as_uri(), "0" * 32, "x.zip")
    with pytest.raises(DataNotFoundError) as info:
        ensure_archives([spec], root, download=True)
    message = str(info.value)
    assert "x.zip" in message and "download failed" in message and "gone.zip" in message
    assert "data_dir=" in message and "SHAREBONE_DATA_DIR" in message
    assert tree(root) == []


def test_ensure_archives_download_with_wrong_md5_is_not_found(tmp_path, source):
    root = tmp_path / "data"
    spec = ArchiveSpec(source.name, source.url, "f" * 32, source.filename)
    with pytest.raises(DataNotFoundError, match="download failed.*md5"):
        ensure_archives([spec], root)
    assert tree(root) == []


def test_ensure_archives_lists_every_missing_file(tmp_path):
    specs = [ArchiveSpec(n, f"https://example.invalid/{n}.zip", "0" * 32, f"{n}.zip") for n in "ab"]
    with pytest.raises(DataNotFoundError) as info:
        ensure_archives(specs, tmp_path, download=False)
    assert "a.zip" in str(info.value) and "b.zip" in str(info.value)


def test_resolve_data_dir_prefers_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHAREBONE_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("SHAREBONE_DATA_DIR")
    with pytest.raises(DataNotFoundError, match="data_dir=.*SHAREBONE_DATA_DIR"):
        resolve_data_dir(None)


# ------------------------------------------------------------------------------------ SafeZip


def test_safe_zip_reads_members_without_extracting(tmp_path):
    path = tmp_path / "ok.zip"
    path.write_bytes(zip_with_members({"top/": b"", "top/a.png": b"A", "top/b.txt": b"B"}))
    with SafeZip(path) as archive:
        assert archive.names() == ["top/a.png", "top/b.txt"]
        assert archive.names(suffix=".png") == ["top/a.png"]
        assert archive.read("top/a.png") == b"A"
    assert tree(tmp_path) == ["ok.zip"]


@pytest.mark.parametrize(
    "member",
    ["../evil.png", "top/../../evil.png", "/abs/evil.png", "..\\evil.png", "C:/evil.png"],
)
def test_safe_zip_refuses_members_escaping_the_target(tmp_path, member):
    path = tmp_path / "evil.zip"
    path.write_bytes(zip_with_members({"top/ok.png": b"ok", member: b"evil"}))
    with pytest.raises(UnsafeArchiveError) as info:
        SafeZip(path)
    assert repr(member) in str(info.value) and str(path) in str(info.value)
    assert tree(tmp_path) == ["evil.zip"]


def test_check_member_name_accepts_ordinary_names():
    check_member_name("a.zip", "images_background/Greek/character01/0394_01.png")
    check_member_name("a.zip", "dots..in/name..png")


def test_truncated_zip_is_corrupt(tmp_path):
    data = data_fixtures.omniglot_zip_bytes("top", {"Greek": 1}, n_images=2)
    path = tmp_path / "truncated.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArchiveError) as info:
        SafeZip(path)
    assert str(path) in str(info.value) and "download it" in str(info.value)
    assert tree(tmp_path) == ["truncated.zip"]


def test_zip_with_a_damaged_member_is_corrupt(tmp_path):
    payload = b"0123456789" * 100
    data = bytearray(zip_with_members({"top/a.bin": payload}))
    start = bytes(data).index(payload)
    data[start + 10] ^= 0xFF  # stored (uncompressed): flips one byte of the content -> bad CRC
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    with SafeZip(path) as archive, pytest.raises(CorruptArchiveError) as info:
        archive.read("top/a.bin")
    assert "top/a.bin" in str(info.value) and str(path) in str(info.value)


def test_missing_zip_is_not_found(tmp_path):
    with pytest.raises(DataNotFoundError):
        SafeZip(tmp_path / "nope.zip")
