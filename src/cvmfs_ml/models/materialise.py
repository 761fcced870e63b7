"""Local folders made from a repository: a verified copy (:func:`materialise`, hard-linked
from the client's cache where the file system allows) or a folder of links into a mount
(:func:`link_tree`), each appearing at its destination only when complete.

Both write into a staging folder beside the destination, held with a lock while it is filled
(:func:`cvmfs_ml.storage.held.held_folder`: one a killed process left is removed by the next
copy made beside it), then moved into place by one rename; a volume's root (KServe's
``/mnt/models`` emptyDir), which cannot be renamed onto, gets the entries moved instead. What
decides where a reference leads, and whether a copy is still current, is in
:mod:`cvmfs_ml.models.refs` and :mod:`cvmfs_ml.models.copies`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from cvmfs_ml.client.cache_file import preallocate
from cvmfs_ml.cvmfs.catalog import MARKER
from cvmfs_ml.errors import ConfigError, CvmfsMlError, UnsafeInputError, is_disk_full
from cvmfs_ml.models.copies import STAGING_PREFIX, followed
from cvmfs_ml.storage.held import held_folder

__all__ = ["Progress", "Warn", "is_complete", "link_tree", "materialise"]

_COPY_BLOCK = 8 * 2**20

Progress = Callable[[int], None]
"""Called with the number of bytes just written (for progress bars)."""

Warn = Callable[[str], None]
"""Called with one line about something written differently from the source (a kept link)."""


def _check_dest(dest: Path) -> None:
    """``dest`` must be absent or an empty folder: nothing a user made is ever overwritten."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ConfigError(f"{dest} exists and is not an empty folder; pick another destination")
    if dest.is_dir() and any(dest.iterdir()):
        raise ConfigError(f"{dest} is not empty; pick an empty or new folder")


@contextlib.contextmanager
def _staging(dest: Path) -> Any:
    """A fresh folder beside ``dest``, moved into place on success and removed on failure.

    Inside ``dest`` where it is a volume's root (KServe's ``/mnt/models`` emptyDir): nothing
    can be renamed onto a mount point or across one. The folder is held with a lock while it
    is filled, so that one a killed process left is removed by the next copy made beside it
    (:func:`cvmfs_ml.storage.held.held_folder`)."""
    parent = dest if dest.is_dir() and os.path.ismount(dest) else dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with held_folder(parent, STAGING_PREFIX, f"{dest.name}.") as stage:
            yield stage
            _into_place(stage, dest, parent)
    except OSError as exc:
        if is_disk_full(exc) and not isinstance(exc, CvmfsMlError):
            # A write's ENOSPC names no file: say which disk is full (not the cache's).
            raise OSError(exc.errno, exc.strerror, os.path.abspath(parent)) from exc
        raise


def _into_place(stage: Path, dest: Path, parent: Path) -> None:
    """Move the complete ``stage`` to ``dest`` (its entries, where ``dest`` is a volume's root)."""
    if parent == dest:
        _move_entries(stage, dest)
        return
    try:
        if dest.is_dir():
            dest.rmdir()  # empty (checked before); fails for a volume's mount point
        os.replace(stage, dest)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EXDEV):  # a bind mount ismount() does not see
            _move_entries(stage, dest)
            return
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and is_complete(dest):
            return  # another process finished the same copy first (it is the same content)
        raise


def _move_entries(stage: Path, dest: Path) -> None:
    """Move ``stage``'s entries into an existing ``dest`` (a volume's root cannot be renamed),
    copying across file systems; on failure ``dest`` is left as empty as it was."""
    moved: list[Path] = []
    try:
        dest.mkdir(exist_ok=True)
        for entry in sorted(stage.iterdir()):
            moved.append(dest / entry.name)
            shutil.move(entry, dest / entry.name)
    except BaseException:
        for path in moved:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def link_tree(source: Path, dest: Path) -> Path:
    """``dest``: a folder of symlinks to each entry of ``source`` (or one link for a file), the
    way KServe's storage initializer handles a local path. ``dest`` must be absent or empty."""
    _check_dest(dest)
    with _staging(dest) as stage:
        if source.is_dir():
            for entry in sorted(source.iterdir()):
                if entry.name == MARKER:
                    continue
                os.symlink(entry, stage / entry.name)
        else:
            os.symlink(source, stage / source.name)
    return dest


def _hard_link_or_copy(pieces: list[Path], target: Path, progress: Progress | None) -> None:
    if len(pieces) == 1:
        with contextlib.suppress(OSError):
            os.link(pieces[0], target)
            os.chmod(target, 0o444)  # shared inode with the cache: keep it read-only
            if progress is not None:
                progress(target.stat().st_size)
            return
    with open(target, "wb") as out:
        preallocate(out.fileno(), sum(os.stat(piece).st_size for piece in pieces))
        for piece in pieces:
            with open(piece, "rb") as src:
                _append(src, out, progress)
    os.chmod(target, 0o444)


def _append(src: BinaryIO, out: BinaryIO, progress: Progress | None) -> None:
    """Copy ``src`` to the end of ``out`` inside the kernel (``copy_file_range``: one copy, or
    none where the file system shares blocks), with a plain read/write loop as the fallback."""
    while True:
        try:
            n = os.copy_file_range(src.fileno(), out.fileno(), _COPY_BLOCK)
        except OSError:  # not supported here (another file system, an old kernel)
            break
        if n <= 0:
            return
        if progress is not None:
            progress(n)
    while block := src.read(_COPY_BLOCK):
        out.write(block)
        if progress is not None:
            progress(len(block))


def _materialise_file(repo: Any, entry: Any, target: Path, progress: Progress | None) -> None:
    layout = repo.layout(entry)
    pieces = [repo.piece_path(layout, i) for i in range(len(layout.pieces))]
    _hard_link_or_copy(pieces, target, progress)
    size = target.stat().st_size
    if size != entry.size:
        raise UnsafeInputError(entry.path, f"materialised {size} bytes, catalog says {entry.size}")


def _materialise_link(repo: Any, base: str, entry: Any, target: Path, progress: Progress | None,
                      warn: Warn | None) -> None:  # fmt: skip
    """One symlink of a copied folder (see :func:`materialise`)."""
    if not entry.symlink or "\0" in entry.symlink:  # what no file system stores as a link
        if warn is not None:
            warn(f"{entry.path}: a link to {entry.symlink!r} cannot be written; left out")
        return
    found = followed(repo, base, entry)
    if found is not None and not isinstance(found, str):
        _materialise_file(repo, found, target, progress)  # verified bytes of the repository
        return
    os.symlink(entry.symlink, target)
    if found is not None and warn is not None:
        rel = entry.path[len(base) :].lstrip("/")
        warn(f"{rel}: a link to {entry.symlink!r} that {found}, kept as it is (not followed)")


def _materialise_tree(repo: Any, base: str, stage: Path, progress: Progress | None,
                      warn: Warn | None) -> None:  # fmt: skip
    """Every entry below the folder ``base`` into ``stage`` (see :func:`materialise`)."""
    for entry in repo.walk(base):
        if posixpath.basename(entry.path) == MARKER:
            continue  # the publisher's nested-catalog marker, not part of the model
        target = stage / entry.path[len(base) :].lstrip("/")
        if entry.is_dir:
            target.mkdir()
        elif entry.is_symlink:
            _materialise_link(repo, base, entry, target, progress, warn)
        elif entry.is_regular:
            _materialise_file(repo, entry, target, progress)


def materialise(repo: Any, path: str, dest: Path, *, progress: Progress | None = None,
                warn: Warn | None = None) -> Path:  # fmt: skip
    """Write the file or folder at ``path`` (symlinks followed) of ``repo`` into ``dest``.

    Every piece is prefetched in parallel, verified by the client, then hard-linked from the
    cache or copied; the folder appears at ``dest`` only when complete.

    Symlinks inside the folder are followed the way the destination will follow them. One that
    leads to something inside the folder is kept as a link. One that leads out of it to a
    regular file of the repository is written as that file's bytes (from the repository,
    verified; a model that shares weights with another keeps working). Any other one (to a
    folder elsewhere, to a path outside the repository such as ``/etc/shadow``, to nothing) is
    kept as the same link, and ``warn`` is told: nothing outside the repository is ever read,
    and a folder elsewhere is not copied whole.
    """
    _check_dest(dest)
    top = repo.resolve(path)
    base = top.path
    repo.prefetch(base)  # every piece of every file, in parallel
    with _staging(dest) as stage:
        if top.is_dir:
            _materialise_tree(repo, base, stage, progress, warn)
        else:  # one file: the folder holds it alone, as readable as a folder's copy
            _materialise_file(repo, top, stage / posixpath.basename(base), progress)
        for folder in [stage, *(p for p in stage.rglob("*") if p.is_dir() and not p.is_symlink())]:
            os.chmod(
                folder, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
            )
    return dest


def is_complete(folder: Path) -> bool:
    """A materialised copy appears by one rename, so any non-empty one is complete."""
    return folder.is_dir() and not folder.is_symlink() and any(folder.iterdir())
