"""A round's scratch folder, and the removal of those that killed rounds left (a sync round's,
or an image push's: :mod:`cvmfs_ml.sync.push`).

Each round unpacks into ``cvmfs-ml-sync.<random>/`` under ``--scratch`` (or ``TMPDIR``) and
removes it as it ends. A process that cannot unwind (``kill -9``, the OOM killer, a power cut)
leaves it, half an image inside. So the round holds a lock on ``cvmfs-ml-sync.<random>.lock``
beside its folder for as long as it lives (the kernel drops it with the process), and every
round first removes the folders whose lock nobody holds. The lock is taken before the folder
exists, so a folder is never seen without its lock held; a folder without a lock file (being
removed, or older than this) is left alone, and another live round's never taken.
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

__all__ = ["round_scratch"]

PREFIX = "cvmfs-ml-sync."
_LOCK = ".lock"


def _remove(folder: Path) -> None:
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


def remove_abandoned(parent: Path) -> None:
    """Remove the round folders (and lone lock files) under ``parent`` no live round holds."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        stem = name.removesuffix(_LOCK)
        lock = parent / (stem + _LOCK)
        if name.endswith(_LOCK) and stem in names:
            continue  # seen with its folder
        folder = parent / stem
        if not _ours(lock, stat.S_IFREG) or (
            os.path.lexists(folder) and not _ours(folder, stat.S_IFDIR)
        ):
            continue  # another user's, or not what a round makes: not ours to remove
        fd = _unheld(lock)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                _remove(folder)
                lock.unlink()  # once the folder is gone: else the next round tries again
        finally:
            os.close(fd)


def _held_lock(parent: Path) -> tuple[int, Path]:
    """A new lock file under ``parent``, locked by us and still in place.

    Between its creation and the lock, another round may find it unheld and remove it (as
    it would a killed round's); the lock is then on a file no longer there, and a new one is
    made, so that the folder always has its lock file beside it."""
    while True:
        fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=_LOCK, dir=parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            in_place = os.lstat(name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            in_place = False
        if in_place:
            return fd, Path(name)
        os.close(fd)


@contextlib.contextmanager
def round_scratch(scratch: Path | None) -> Iterator[Path]:
    """A new folder for one round under ``scratch`` (default: the system's temporary folder),
    removed as the round ends; what killed rounds left there goes first."""
    parent = Path(scratch if scratch is not None else tempfile.gettempdir())
    remove_abandoned(parent)
    fd, lock = _held_lock(parent)
    folder = Path(str(lock).removesuffix(_LOCK))
    try:
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            _remove(folder)
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
