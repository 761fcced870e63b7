"""Folders a process holds for as long as it fills them, and the removal of those that killed
processes left: a sync round's scratch folder (:mod:`cvmfs_ml.sync.scratch`), a copy being
materialised (:mod:`cvmfs_ml.models.materialise`).

A process works in ``<prefix><random>/`` and removes it (or renames it into place) as it ends.
One that cannot unwind (``kill -9``, the OOM killer, a power cut) leaves it, half an image or
half a model inside. So the process holds a lock on ``<prefix><random>.lock`` beside its folder
for as long as it lives (the kernel drops it with the process), and every process making such a
folder first removes those whose lock nobody holds. The lock is taken before the folder exists,
so a folder is never seen without its lock held; a folder without a lock file (being removed,
or older than this) is left alone, and another live process's never taken. Only this user's
real folders and files are removed, never through a link: in a shared folder (``/tmp``) names
like ours may be anyone's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["held_folder", "remove_abandoned", "remove_tree"]

_LOCK = ".lock"


def remove_tree(folder: Path) -> None:
    """Remove ``folder``, also where a layer left a folder its owner cannot write or read.

    Modes are reset below ``folder`` only: never its parent (a shared /tmp), and never through
    a link (``rmtree`` refuses one as ``folder``, and unlinks those inside)."""
    top = os.path.abspath(folder)

    def reset(func: object, name: str, exc_info: object) -> None:
        if os.path.abspath(name) == top:
            return  # not a folder we may change (a link, or gone): left as it is
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            if stat.S_ISDIR(os.lstat(name).st_mode):  # never chmod through a symlink
                os.chmod(name, 0o700)
                shutil.rmtree(name, onerror=reset)
            else:
                os.unlink(name)

    if os.path.lexists(folder):
        shutil.rmtree(folder, onerror=reset)


def _ours(path: Path, kind: int) -> bool:
    """``path`` is of ``kind`` (``stat.S_IFDIR``, ``S_IFREG``), not a link, and this user's:
    in a shared folder, names like a round's may be anyone's."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_IFMT(info.st_mode) == kind and info.st_uid == os.geteuid()


def _unheld(lock: Path) -> int | None:
    """An open descriptor on ``lock`` locked by us, or None if it is missing or held."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders named ``<prefix>...`` (and lone lock files) under ``parent`` that no
    live process holds."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        stem = name.removesuffix(_LOCK)
        lock = parent / (stem + _LOCK)
        if name.endswith(_LOCK) and stem in names:
            continue  # seen with its folder
        folder = parent / stem
        if not _ours(lock, stat.S_IFREG) or (
            os.path.lexists(folder) and not _ours(folder, stat.S_IFDIR)
        ):
            continue  # another user's, or not what we make: not ours to remove
        fd = _unheld(lock)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                remove_tree(folder)
                lock.unlink()  # once the folder is gone: else the next one tries again
        finally:
            os.close(fd)


def _held_lock(parent: Path, prefix: str) -> tuple[int, Path]:
    """A new lock file under ``parent``, locked by us and still in place.

    Between its creation and the lock, another process may find it unheld and remove it (as
    it would a killed one's); the lock is then on a file no longer there, and a new one is
    made, so that the folder always has its lock file beside it."""
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=_LOCK, dir=parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            in_place = os.lstat(name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            in_place = False
        if in_place:
            return fd, Path(name)
        os.close(fd)


@contextlib.contextmanager
def held_folder(parent: Path, prefix: str, name: str = "") -> Iterator[Path]:
    """A new folder ``<prefix><name><random>`` under ``parent``, held (locked) until the body
    ends and then removed if it is still there (the body may have renamed it into place).

    What killed processes left under ``parent`` with ``prefix`` goes first."""
    remove_abandoned(parent, prefix)
    fd, lock = _held_lock(parent, prefix + name)
    folder = Path(str(lock).removesuffix(_LOCK))
    try:
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            remove_tree(folder)
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
