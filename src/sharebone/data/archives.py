"""Dataset archives: checksummed atomic downloads and safe zip reading.

Generic over datasets: a dataset module declares its archives as :class:`ArchiveSpec` values and
calls :func:`ensure_archives` to find (or download) them, then reads members through
:class:`SafeZip` without extracting to disk.

Guarantees:

* A download is atomic. Bytes are streamed into a temporary file next to the destination, the md5
  is checked, and only then is the file moved into place with ``os.replace``. On any failure
  (network error, md5 mismatch, ``KeyboardInterrupt``) the temporary file is removed and nothing
  is created at the destination.
* A local archive whose md5 is wrong is an error (:class:`ChecksumError`) and is left untouched:
  the user decides whether to delete it; sharebone never deletes a file it did not create.
* A zip member whose path is absolute or contains ``..`` makes the whole archive refused
  (:class:`UnsafeArchiveError`); a truncated or corrupt zip raises :class:`CorruptArchiveError`.

Every error derives from :class:`DataError` and says what to do about it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

#: Environment variable naming the data folder (``<data_dir>/<dataset>/<archive>``).
DATA_DIR_ENV = "SHAREBONE_DATA_DIR"

_CHUNK = 1 << 20


class DataError(RuntimeError):
    """Base class of sharebone's data errors; each message says how to fix the problem."""


class DataNotFoundError(DataError):
    """An archive is missing locally and could not (or may not) be downloaded."""


class ChecksumError(DataError):
    """A file's md5 differs from the expected one."""


class UnsafeArchiveError(DataError):
    """An archive has a member that would escape the extraction folder."""


class CorruptArchiveError(DataError):
    """An archive is truncated or corrupt, or its content does not have the expected layout."""


class DownloadError(DataError):
    """A download failed (network error, unreadable URL, destination not writable)."""


@dataclass(frozen=True)
class ArchiveSpec:
    """One downloadable archive.

    Attributes:
        name: short identifier used in configs (e.g. ``"images_background"``).
        url: where to download it from (``https://``, ``http://`` or ``file://``).
        md5: expected md5 hex digest of the whole file.
        filename: the file's name on disk, inside the dataset's data folder.
    """

    name: str
    url: str
    md5: str
    filename: str


def md5sum(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """The md5 hex digest of a file, read in chunks (constant memory)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike[str], md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its md5.

    The bytes are streamed into a temporary file in ``dest``'s folder (created if needed) while
    being hashed; if the md5 matches, the temporary file is moved onto ``dest`` with
    ``os.replace``. On any failure the temporary file is removed and ``dest`` is not created (an
    existing ``dest`` is left as it was).

    Raises:
        DownloadError: the URL could not be read or the destination is not writable.
        ChecksumError: the downloaded bytes do not have the expected md5.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(
            f"Cannot write the download of {url} into {dest.parent}: {e}. Choose a writable data "
            "folder, or download the file yourself and place it there."
        ) from e
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DownloadError(f"Cannot download {url}: {e}") from e
            with response:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except OSError as e:
                        raise DownloadError(
                            f"Download of {url} failed after {size} bytes: {e}"
                        ) from e
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        actual = digest.hexdigest()
        if actual != md5:
            raise ChecksumError(
                f"The download of {url} ({size} bytes) has md5 {actual}, expected {md5}; it was "
                "discarded. The file at that URL has changed or the transfer was corrupted: "
                "retry, or download it by hand and check its md5."
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a data file is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("Downloaded %s to %s (%d bytes, md5 ok)", url, dest, size)
    return dest


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir`` as a path; if it is ``None``, the ``SHAREBONE_DATA_DIR`` environment variable.

    Raises:
        DataNotFoundError: ``data_dir`` is ``None`` and the environment variable is not set.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    raise DataNotFoundError(
        "No data folder given. Set one with the Hydra override `data_dir=/path/to/data` or the "
        f"environment variable {DATA_DIR_ENV}=/path/to/data."
    )


def _not_found_message(
    missing: Iterable[tuple[ArchiveSpec, str | None]], root: Path, download: bool
) -> str:
    lines = [f"Missing dataset archive(s) in {root}:"]
    for spec, reason in missing:
        lines.append(f"  - {spec.filename} (md5 {spec.md5}) from {spec.url}")
        if reason:
            lines.append(f"      download failed: {reason}")
    if not download:
        lines.append("Downloading is disabled (download=False).")
    lines.append(
        f"Fix: download the file(s) from the URL(s) above into {root}, or point sharebone at a "
        f"data folder that already holds them under <data_dir>/{root.name}/: Hydra override "
        f"`data_dir=/path/to/data`, or environment variable {DATA_DIR_ENV}=/path/to/data."
    )
    return "\n".join(lines)


def _check_local(spec: ArchiveSpec, path: Path) -> None:
    actual = md5sum(path)
    if actual != spec.md5:
        raise ChecksumError(
            f"{path} has md5 {actual}, expected {spec.md5} ({spec.name}). It is incomplete, "
            f"corrupt or a different version; sharebone leaves it untouched. Fix: delete it and "
            f"run again to re-download it, or replace it with a fresh copy from {spec.url}."
        )


def _ensure(spec: ArchiveSpec, root: Path, allow_download: bool) -> tuple[Path, str | None]:
    """(path, None) if the archive is (now) present and verified, else (path, failure reason)."""
    path = root / spec.filename
    if path.exists():
        _check_local(spec, path)
        return path, None
    if not allow_download:
        return path, None
    try:
        download(spec.url, path, spec.md5)
    except (DownloadError, ChecksumError) as e:
        return path, str(e)
    return path, None


def ensure_archives(
    specs: Iterable[ArchiveSpec], root: str | os.PathLike[str], download: bool = True
) -> list[Path]:
    """Paths of the verified archives ``root/spec.filename``, downloading missing ones if allowed.

    Every archive is checked before raising, so one error lists all the missing files.

    Raises:
        ChecksumError: a local file has the wrong md5 (the file is not touched).
        DataNotFoundError: some archives are missing and could not or may not be downloaded.
    """
    root = Path(root)
    paths: list[Path] = []
    missing: list[tuple[ArchiveSpec, str | None]] = []
    for spec in specs:
        path, reason = _ensure(spec, root, download)
        if path.exists():
            paths.append(path)
        else:
            missing.append((spec, reason))
    if missing:
        raise DataNotFoundError(_not_found_message(missing, root, download))
    return paths


def ensure_archive(spec: ArchiveSpec, root: str | os.PathLike[str], download: bool = True) -> Path:
    """The path of the verified archive ``root/spec.filename``; downloads it if allowed.

    Raises:
        ChecksumError: the local file has the wrong md5 (the file is not touched).
        DataNotFoundError: it is missing and could not or may not be downloaded.
    """
    return ensure_archives([spec], root, download=download)[0]


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member_name(archive: str | os.PathLike[str], name: str) -> None:
    """Refuse a zip member name that is absolute or contains ``..``.

    Raises:
        UnsafeArchiveError: naming the archive and the member.
    """
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    if normalized.startswith("/") or _DRIVE.match(normalized) or ".." in parts or "\0" in name:
        raise UnsafeArchiveError(
            f"Refusing archive {archive}: member {name!r} has an absolute path or '..' and would "
            "escape the target folder. The archive is not a genuine copy; delete it and download "
            "it again from the official URL."
        )


def _corrupt(archive: Path, detail: str) -> CorruptArchiveError:
    return CorruptArchiveError(
        f"Archive {archive} is truncated or corrupt ({detail}). Fix: delete it and download it "
        "again (or copy it again from a good source)."
    )


class SafeZip:
    """A read-only zip archive whose member names have all been validated.

    Members are read into memory (no extraction to disk). Opening validates every member name
    (:func:`check_member_name`); reading converts zip/CRC/decompression errors into
    :class:`CorruptArchiveError`.

    Example::

        with SafeZip(path) as archive:
            for name in archive.names(suffix=".png"):
                data = archive.read(name)
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise _corrupt(self.path, str(e)) from e
        except FileNotFoundError as e:
            raise DataNotFoundError(f"Archive {self.path} does not exist.") from e
        try:
            self._infos = self._zip.infolist()
            for info in self._infos:
                check_member_name(self.path, info.filename)
        except BaseException:
            self._zip.close()
            raise

    def names(self, suffix: str = "") -> list[str]:
        """File (not folder) members ending with ``suffix``, in archive order."""
        return [
            info.filename
            for info in self._infos
            if not info.is_dir() and info.filename.endswith(suffix)
        ]

    def read(self, name: str) -> bytes:
        """The member's bytes, CRC-checked."""
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
            raise _corrupt(self.path, f"member {name!r}: {e}") from e

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """``(name, bytes)`` for each name."""
        for name in names:
            yield name, self.read(name)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
