"""Dataset archives: checksummed atomic downloads and safe zip reading.

Generic over datasets: a dataset module declares its archives as :class:`ArchiveSpec` values and
calls :func:`ensure_archives` to find (or download) them, then reads members through
:class:`SafeZip` without extracting to disk.

Guarantees:

* A download is atomic (:func:`sharebone.files.atomic_write`). Bytes are streamed into a
  temporary file next to the destination, the md5 is checked, and only then is the file moved
  into place with ``os.replace``. On any failure (network error, md5 mismatch,
  ``KeyboardInterrupt``) the temporary file is removed and nothing is created at the destination.
* A local archive whose md5 is wrong is an error (:class:`ChecksumError`) and is left untouched:
  the user decides whether to delete it; sharebone never deletes a file it did not create.
* An archive path that is not a regular file (a directory, a FIFO, a link to ``/dev/zero``) is
  refused before anything reads it (:class:`NotAFileError`).
* A zip member whose path is absolute or contains ``..``, or that is a symbolic link, makes the
  whole archive refused (:class:`UnsafeArchiveError`); so does reading a member that inflates to
  more than :data:`MAX_MEMBER_BYTES` (a zip bomb), whatever its header says. A truncated,
  corrupt or encrypted zip, or one naming a member twice, raises :class:`CorruptArchiveError`.

Every error derives from :class:`DataError` and says what to do about it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import stat
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from sharebone.errors import ShareboneError
from sharebone.files import atomic_write

log = logging.getLogger(__name__)

#: Environment variable naming the data folder (``<data_dir>/<dataset>/<archive>``).
DATA_DIR_ENV = "SHAREBONE_DATA_DIR"

_CHUNK = 1 << 20

#: The most bytes one zip member may inflate to. Dataset members are small files (an Omniglot
#: drawing is about 1 KiB); a member beyond this is a zip bomb or not the dataset. Raise it (a
#: module attribute, read at each :class:`SafeZip`) for a dataset with larger members.
MAX_MEMBER_BYTES = 64 << 20


class DataError(ShareboneError, RuntimeError):
    """Base class of sharebone's data errors; each message says how to fix the problem."""


class DataNotFoundError(DataError):
    """An archive is missing locally and could not (or may not) be downloaded."""


class ChecksumError(DataError):
    """A file's md5 differs from the expected one."""


class UnsafeArchiveError(DataError):
    """An archive has a member that would escape the extraction folder (an absolute path, ``..``
    or a symbolic link) or exhaust memory (it inflates beyond :data:`MAX_MEMBER_BYTES`)."""


class NotAFileError(DataError):
    """A path that should be a regular file (an archive) is a directory, a device, a FIFO..."""


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


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` unless it is (a link to) a regular file, before anything opens it:
    reading a FIFO or ``/dev/zero`` would hang, a directory gives a bare ``IsADirectoryError``.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        NotAFileError: something other than a regular file is, naming the path and its kind.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise NotAFileError(
            f"{path}{link} is a {_file_kind(mode)}, not a file; an archive must be a regular "
            "file. sharebone leaves it untouched. Fix: move it out of the way and put the "
            "archive file there (or let sharebone download it)."
        )


def md5sum(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """The md5 hex digest of a regular file, read in chunks (constant memory).

    Raises:
        NotAFileError: ``path`` is a directory, device, FIFO... (it is not read).
    """
    require_regular_file(path)
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike[str], md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its md5.

    The bytes are streamed into a temporary file in ``dest``'s folder (created if needed) while
    being hashed (:func:`sharebone.files.atomic_write`); if the md5 matches, the temporary file
    is moved onto ``dest``. On any failure the temporary file is removed and ``dest`` is not
    created (an existing ``dest`` is left as it was).

    Raises:
        DownloadError: the URL could not be read or the destination is not writable.
        ChecksumError: the downloaded bytes do not have the expected md5.
    """
    dest = Path(dest)
    size = 0
    try:
        with atomic_write(dest) as out:
            digest = hashlib.md5(usedforsecurity=False)
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
                    f"The download of {url} ({size} bytes) has md5 {actual}, expected {md5}; it "
                    "was discarded. The file at that URL has changed or the transfer was "
                    "corrupted: retry, or download it by hand and check its md5."
                )
    except OSError as e:  # the network's errors are DownloadErrors already: this is the disk
        raise DownloadError(
            f"Cannot write the download of {url} into {dest.parent}: {e}. Choose a writable data "
            "folder, or download the file yourself and place it there."
        ) from e
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
    actual = md5sum(path)  # refuses a directory, FIFO or device before reading it
    if actual != spec.md5:
        raise ChecksumError(
            f"{path} has md5 {actual}, expected {spec.md5} ({spec.name}). It is incomplete, "
            f"corrupt or a different version; sharebone leaves it untouched. Fix: delete it and "
            f"run again to re-download it, or replace it with a fresh copy from {spec.url}."
        )


def _ensure(spec: ArchiveSpec, root: Path, allow_download: bool) -> tuple[Path, str | None]:
    """(path, None) if the archive is (now) present and verified, else (path, failure reason)."""
    path = root / spec.filename
    if path.exists() or path.is_symlink():  # a dangling link is replaced by the download
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
        NotAFileError: an archive's path holds a directory, FIFO, device... (not touched).
        DataNotFoundError: some archives are missing and could not or may not be downloaded, or
            ``root`` lies under a file instead of a folder.
    """
    root = Path(root)
    _require_folder(root)
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


def _require_folder(root: Path) -> None:
    """``root`` and the parts of it that exist must be folders (a data dir can be a file)."""
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise DataNotFoundError(
                    f"{folder} is a file, not a folder; the data folder must be a folder that "
                    f"holds (or may receive) {root}. Fix: point sharebone at a folder: Hydra "
                    f"override `data_dir=/path/to/data`, or environment variable "
                    f"{DATA_DIR_ENV}=/path/to/data."
                )
            return


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


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)  # 3: Unix


class SafeZip:
    """A read-only zip archive whose members have all been validated.

    Members are read into memory (no extraction to disk). Opening refuses a path that is not a
    regular file (:func:`require_regular_file`), a member name that is absolute or contains
    ``..`` (:func:`check_member_name`), a symbolic-link member, an encrypted member and a name
    present twice. Reading refuses a member that declares, or inflates to, more than
    ``max_member_bytes`` (default :data:`MAX_MEMBER_BYTES`), and converts zip/CRC/decompression
    errors into :class:`CorruptArchiveError`.

    Example::

        with SafeZip(path) as archive:
            for name in archive.names(suffix=".png"):
                data = archive.read(name)
    """

    def __init__(self, path: str | os.PathLike[str], max_member_bytes: int | None = None):
        self.path = Path(path)
        self.max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
        try:
            require_regular_file(self.path)
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise _corrupt(self.path, str(e)) from e
        except FileNotFoundError as e:
            raise DataNotFoundError(f"Archive {self.path} does not exist.") from e
        except OSError as e:
            raise DataError(f"Cannot read archive {self.path}: {e}") from e
        try:
            self._infos = self._zip.infolist()
            for info in self._infos:
                self._check(info)
            counts = collections.Counter(info.filename for info in self._infos)
            twice = {name: n for name, n in counts.items() if n > 1}
            if twice:
                name, n = next(iter(twice.items()))
                raise _corrupt(self.path, f"member {name!r} appears {n} times"
                               + (f", and {len(twice) - 1} other name(s) too" if len(twice) > 1
                                  else ""))
        except BaseException:
            self._zip.close()
            raise

    def _check(self, info: zipfile.ZipInfo) -> None:
        check_member_name(self.path, info.filename)
        if _is_symlink(info):
            raise UnsafeArchiveError(
                f"Refusing archive {self.path}: member {info.filename!r} is a symbolic link, "
                "which a dataset archive has no use for (extracted, it could point anywhere). "
                "The archive is not a genuine copy; delete it and download it again from the "
                "official URL."
            )
        if info.flag_bits & 0x1:
            raise _corrupt(self.path, f"member {info.filename!r} is encrypted, and sharebone "
                                      "reads no passwords")

    def names(self, suffix: str = "") -> list[str]:
        """File (not folder) members ending with ``suffix``, in archive order."""
        return [
            info.filename
            for info in self._infos
            if not info.is_dir() and info.filename.endswith(suffix)
        ]

    def _too_large(self, name: str, what: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"Refusing archive {self.path}: member {name!r} {what}, more than the "
            f"{self.max_member_bytes:,} bytes a member may have "
            "(sharebone.data.archives.MAX_MEMBER_BYTES). It is a zip bomb or not this dataset: "
            "delete it and download it again from the official URL (or raise MAX_MEMBER_BYTES "
            "if its members really are that large)."
        )

    def read(self, name: str) -> bytes:
        """The member's bytes, CRC-checked, at most ``max_member_bytes`` of them.

        The cap holds twice: against the size the member declares (refused before anything is
        inflated) and against the bytes actually inflated (a header can lie; reading stops one
        byte past the smaller of the two, so memory stays bounded either way).
        """
        try:
            info = self._zip.getinfo(name)
        except KeyError as e:
            raise DataError(f"Archive {self.path} has no member {name!r}.") from e
        if info.file_size > self.max_member_bytes:
            raise self._too_large(name, f"declares {info.file_size:,} bytes")
        try:
            with self._zip.open(info) as member:
                # Not zipfile's read(): it inflates a whole member before cutting it to the
                # declared size, so a header that understates the size costs all of it.
                data = member.read(min(info.file_size, self.max_member_bytes) + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                RuntimeError) as e:  # RuntimeError: zipfile's "password required"
            raise _corrupt(self.path, f"member {name!r}: {e}") from e
        if len(data) > self.max_member_bytes:  # zipfile stops at the declared size; belt and braces
            raise self._too_large(name, f"inflates to over {len(data) - 1:,} bytes")
        return data

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ tar archives


def read_tar_members(path: str | os.PathLike[str], wanted: Iterable[str],
                     max_member_bytes: int | None = None) -> dict[str, bytes]:
    """The bytes of the members ``wanted`` of a (compressed) tar archive, read in one pass.

    Nothing is extracted to disk, so no member can be written outside a folder. Every member is
    still checked as :class:`SafeZip` checks a zip's: a name that is absolute or contains
    ``..``, a symbolic or hard link, a device or FIFO makes the whole archive refused; a wanted
    member larger than ``max_member_bytes`` (declared, or read) is refused before it is held.

    Raises:
        UnsafeArchiveError: as above, naming the member.
        CorruptArchiveError: the archive is truncated or not a tar, or a wanted member is
            missing or not a regular file.
    """
    import tarfile

    path = Path(path)
    limit = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    wanted = set(wanted)
    require_regular_file(path)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:  # a stream: one pass, no seeking back
            for member in tar:
                check_member_name(path, member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(
                        f"Refusing archive {path}: member {member.name!r} is a link, which a "
                        "dataset archive has no use for. The archive is not a genuine copy; "
                        "delete it and download it again from the official URL.")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"Refusing archive {path}: member {member.name!r} is a device or FIFO, "
                        "not a file. Delete the archive and download it again.")
                name = member.name.rstrip("/")
                if name not in wanted:
                    continue
                if not member.isfile():
                    raise _corrupt(path, f"member {name!r} is a folder, not a file")
                if member.size > limit:
                    raise UnsafeArchiveError(
                        f"Refusing archive {path}: member {name!r} declares {member.size:,} "
                        f"bytes, more than the {limit:,} this dataset's members may have.")
                handle = tar.extractfile(member)
                data = handle.read(limit + 1) if handle is not None else b""
                if len(data) != member.size:
                    raise _corrupt(path, f"member {name!r} has {len(data):,} bytes, its header "
                                         f"says {member.size:,}")
                found[name] = data
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise _corrupt(path, str(e) or type(e).__name__) from e
    missing = sorted(wanted - set(found))
    if missing:
        raise _corrupt(path, f"member(s) {missing} are missing; is this the right archive?")
    return found


# ---------------------------------------------------------------------------- pickled arrays


class UnsafePickleError(DataError):
    """A pickle asks for something other than plain data (numpy arrays, dicts, lists, str)."""


#: What a data pickle may construct: numpy arrays, their dtypes and scalars, and bytes (which
#: Python 3 writes as ``_codecs.encode(text, "latin1")`` at protocol 2). Everything else
#: (dicts, lists, str, numbers; bytes at other protocols) needs no lookup at all.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (bytes as latin-1 text), and no other
    codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"a pickled bytes object asks for codec {encoding!r}")
    return text.encode("latin1")


def _pickle_global(module: str, name: str):
    import numpy as np

    if (module, name) == ("numpy", "ndarray"):
        return np.ndarray
    if (module, name) == ("numpy", "dtype"):
        return np.dtype
    if module == "_codecs":
        return _latin1
    from numpy._core import multiarray  # numpy >= 2; numpy.core.* is a shim that warns

    return getattr(multiarray, name)


def load_data_pickle(data: bytes | BinaryIO, where: str, encoding: str = "ASCII") -> object:
    """Unpickle a dataset file (its bytes, or the file opened for reading: then it is read as
    it is unpickled, never held twice) that should hold only numpy arrays, dicts, lists, str
    and numbers (the miniImageNet caches, CIFAR's batches, tieredImageNet's release), and
    refuse anything else.

    A pickle is a program: :func:`pickle.loads` runs whatever callable it names. This one may
    only name numpy's array reconstruction (:data:`_PICKLE_ALLOWED`); an array of Python
    objects is refused too. ``encoding`` is for Python 2 pickles (CIFAR's: ``"bytes"``;
    tieredImageNet's: ``"latin1"``).

    Raises:
        UnsafePickleError: the pickle names anything else (naming it and ``where``).
        CorruptArchiveError: the bytes are not a complete pickle.
    """
    import io
    import pickle

    import numpy as np

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _PICKLE_ALLOWED:
                raise UnsafePickleError(
                    f"Refusing {where}: the pickle asks for {module}.{name}, and a dataset "
                    "file may only hold numpy arrays, dicts, lists, str and numbers (unpickling "
                    "it could run any code). The file is not the dataset; delete it and "
                    "download it again from its official source.")
            return _pickle_global(module, name)

    try:
        source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        obj = Restricted(source, encoding=encoding).load()
    except DataError:
        raise
    except Exception as e:  # a truncated or garbled pickle fails in many ways
        raise CorruptArchiveError(f"{where} is not a complete pickle ({type(e).__name__}: "
                                  f"{e}). Fix: delete it and download it again.") from e

    def check(value: object) -> None:
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise UnsafePickleError(f"Refusing {where}: it holds an array of Python objects; "
                                    "a dataset file holds arrays of numbers.")
        if isinstance(value, dict):
            for key, item in value.items():
                check(key)
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)

    check(obj)
    return obj
