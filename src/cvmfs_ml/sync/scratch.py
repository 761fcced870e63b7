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
    """Remove ``folder``, also where a layer left a folder its owner cannot write or read."""

    def reset(func: object, name: str, exc_info: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            if stat.S_ISDIR(os.lstat(name).st_mode):  # never chmod through a symlink
                os.chmod(name, 0o700)
                shutil.rmtree(name, onerror=reset)
            else:
                os.unlink(name)

    if os.path.lexists(folder):
        shutil.rmtree(folder, onerror=reset)


def _unheld(lock: Path) -> int | None:
    """An open descriptor on ``lock`` locked by us, or None if it is missing or held."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
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
        fd = _unheld(lock)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                _remove(parent / stem)
                lock.unlink()  # once the folder is gone: else the next round tries again
        finally:
            os.close(fd)


@contextlib.contextmanager
def round_scratch(scratch: Path | None) -> Iterator[Path]:
    """A new folder for one round under ``scratch`` (default: the system's temporary folder),
    removed as the round ends; what killed rounds left there goes first."""
    parent = Path(scratch if scratch is not None else tempfile.gettempdir())
    remove_abandoned(parent)
    fd, lock_name = tempfile.mkstemp(prefix=PREFIX, suffix=_LOCK, dir=parent)
    lock = Path(lock_name)
    folder = Path(lock_name.removesuffix(_LOCK))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            _remove(folder)
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
