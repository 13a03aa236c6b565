"""Finding the classes of an image folder: class folders, their images, their groups.

``root/<class>/*.jpg`` or ``root/<group>/<class>/*.jpg`` (hidden entries are not data). A
broken symbolic link holds no image and is skipped with a warning; a link leading outside
``root`` is refused. What makes two classes (or two images) the same one, whatever a split
calls them, is :func:`folder_ident`, :func:`label_ident` and :func:`image_idents`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharebone.data.archives import DataError, DataNotFoundError
from sharebone.data.images import IMAGE_SUFFIXES

__all__ = ["ClassEntry", "Folder", "check_root", "folder_entry", "folder_ident",
           "image_idents", "inside", "label_ident", "refuse_escape", "scan_classes"]


@dataclass
class ClassEntry:
    """One class of a split: its name, its group and where its images come from."""

    name: str
    group: str
    where: str  # for messages: the folder, or the file and label
    items: list[Any] = field(default_factory=list)  # files ([path, size, mtime_ns]) or rows
    ident: str = ""  # what makes two splits' classes the same class (folder, label)


@dataclass
class Folder:
    """One class folder under the root."""

    name: str  # path under root, "class" or "group/class"
    group: str
    path: Path
    files: list[list[Any]]  # [relative path, size, mtime_ns], sorted


def _visible(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _follows(entry: os.DirEntry, test: Callable[[], bool], broken: list[str]) -> bool:
    """``test()`` (``entry.is_dir``/``is_file``, which follow links), False for a broken link:
    a loop (ELOOP, which ``is_file`` raises) or a missing target, noted in ``broken``."""
    try:
        if test():
            return True
    except OSError:
        pass
    if entry.is_symlink() and not os.path.exists(entry.path):
        broken.append(entry.path)
    return False


def _is_image(entry: os.DirEntry, broken: list[str]) -> bool:
    return (os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
            and _follows(entry, entry.is_file, broken))


def _is_dir(entry: os.DirEntry, broken: list[str]) -> bool:
    return _follows(entry, entry.is_dir, broken)


def _warn_broken(broken: list[str]) -> None:
    if broken:
        warnings.warn(f"Skipped {len(broken)} broken symbolic link(s) (a loop, or a target "
                      f"that does not exist): {'; '.join(broken[:5])}"
                      + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
                      + ". They hold no image; remove or fix them to silence this.",
                      stacklevel=5)


def inside(real_root: str, path: str) -> bool:
    """Whether ``path``, links resolved, is ``real_root`` or under it."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def refuse_escape(real_root: str, entry: os.DirEntry | Path, root: Path) -> None:
    """Refuse a symbolic link that leads outside the data folder."""
    path = entry.path if isinstance(entry, os.DirEntry) else str(entry)
    if os.path.islink(path) and not inside(real_root, path):
        raise DataError(
            f"{path} is a symbolic link to {os.path.realpath(path)}, outside the data folder "
            f"{root}; sharebone reads nothing outside it. Fix: copy the data into {root}, or "
            "point task.root at a folder that holds all of it.")


def check_root(root: Path) -> Path:
    """``root`` as an existing folder, or a clear error naming it."""
    if not root.exists():
        raise DataNotFoundError(
            f"The data folder {root} does not exist. Fix: point the task at your images with "
            "`task.root=/path/to/images` (layout root/<class>/*.jpg).")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; task.root must be the folder that "
                        "holds the class folders (root/<class>/*.jpg).")
    return root


def scan_classes(root: str | os.PathLike[str]) -> list[Folder]:
    """Every class folder under ``root`` (``root/<class>/`` or ``root/<group>/<class>/``).

    A broken symbolic link (a loop, a missing target) holds no image: it is skipped with a
    warning, like an entry that is not an image.

    Raises:
        DataError: ``root`` is missing, a file or holds no class folder; an image sits
            directly in ``root``; a symbolic link leads outside ``root``.
    """
    root = check_root(Path(root).expanduser())
    real_root = os.path.realpath(root)
    folders: list[Folder] = []
    broken: list[str] = []
    top = _visible(root)
    stray = [e.path for e in top if _is_image(e, broken)]
    if stray:
        raise DataError(
            f"{stray[0]} is not in a class folder ({len(stray)} such image(s) in {root}): an "
            "image's folder is its class. Fix: move it into root/<class>/, or point task.root "
            "at the folder above the class folders.")

    def files_of(folder: Path, entries: list[os.DirEntry]) -> list[list[Any]]:
        out = []
        for e in entries:
            if _is_image(e, broken):
                refuse_escape(real_root, e, root)
                st = e.stat()
                out.append([os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns])
        return out

    for entry in top:
        if not _is_dir(entry, broken):
            continue
        refuse_escape(real_root, entry, root)
        inner = _visible(Path(entry.path))
        files = files_of(Path(entry.path), inner)
        if files:
            folders.append(Folder(entry.name, "", Path(entry.path), files))
            continue
        for sub in inner:
            if not _is_dir(sub, broken):
                continue
            refuse_escape(real_root, sub, root)
            files = files_of(Path(sub.path), _visible(Path(sub.path)))
            if files:
                folders.append(Folder(f"{entry.name}/{sub.name}", entry.name, Path(sub.path),
                                      files))
    _warn_broken(sorted(set(broken)))
    if not folders:
        raise DataError(
            f"{root} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)}). "
            "Expected root/<class>/*.jpg or root/<group>/<class>/*.jpg; is task.root the right "
            "folder?")
    return folders


def folder_ident(folder: Folder) -> str:
    """A class folder's identity: its real path (a symbolic link inside the root, or the same
    folder named as ``group/class`` and as ``class``, is still the same class)."""
    return os.path.realpath(folder.path)


def folder_entry(folder: Folder, name: str, group: str) -> ClassEntry:
    """A class folder as a split's class, named ``name`` in group ``group``."""
    return ClassEntry(name, group, str(folder.path), folder.files, folder_ident(folder))


def label_ident(label: str, folders: Mapping[str, Folder] | None) -> str:
    """A CSV label's identity: the class folder of that name (or the one folder with that last
    part), so a CSV split and a class list naming the same class collide; else the label."""
    if folders:
        if label in folders:
            return folder_ident(folders[label])
        leaves = [f for name, f in folders.items() if name.rsplit("/", 1)[-1] == label]
        if len(leaves) == 1:
            return folder_ident(leaves[0])
    return label


def image_idents(root: Path, items: Sequence[Sequence[Any]]) -> dict[str, str]:
    """Real path -> path under root of each image (``[relative path, size, mtime]`` items);
    folders are resolved once each, files only when they are links."""
    real_dirs: dict[str, str] = {}
    out = {}
    for rel, *_ in items:
        head, name = os.path.split(rel)
        if head not in real_dirs:
            real_dirs[head] = os.path.realpath(root / head)
        path = os.path.join(real_dirs[head], name)
        out[os.path.realpath(path) if os.path.islink(path) else path] = rel
    return out
