"""System calls on the cache files of a file's pieces, for :class:`.files.CvmfsFile`.

Opening them (out of descriptors, the idle ones of every open file of the process are closed
first), reading them with ``preadv`` (``RWF_NOWAIT`` for the FUSE event loop), paging them in
with ``sendfile`` and dropping their pages behind the reader; why each is done this way is in
:mod:`.files`.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_ml.client.readprofile import READ_PROFILE
from cvmfs_ml.storage.pagecache import drop_cached_pages

if TYPE_CHECKING:
    from cvmfs_ml.client.files import CvmfsFile

__all__ = [
    "RWF_NOWAIT",
    "drop_files",
    "filled_bytes",
    "open_files",
    "open_files_lock",
    "open_piece",
    "page_in",
    "preadv_full",
    "release_idle_descriptors",
]


def filled_bytes(size: int, fill: Callable[[memoryview], object]) -> bytes:
    """A ``bytes`` of ``size`` filled in place by ``fill(view)``: no second copy in memory.

    ``BytesIO.getvalue()`` hands over its own buffer when nothing else holds it (CPython,
    shrinking a large buffer with ``realloc``), so the bytes are written once, where they stay.
    """
    buffer = io.BytesIO()
    buffer.seek(size - 1)
    buffer.write(b"\0")
    with buffer.getbuffer() as view:
        fill(view)
    return buffer.getvalue()


RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_nowait_works = bool(RWF_NOWAIT)  # cleared when a file system refuses it


def preadv_full(fd: int, view: memoryview, offset: int, flags: int = 0) -> int:
    """``preadv`` until ``view`` is full or the file ends; returns the bytes read.

    With ``RWF_NOWAIT`` it stops where the page cache ends (the rest would need the disk).
    """
    global _nowait_works
    if flags and not _nowait_works:
        flags = 0
    done = 0
    started = time.perf_counter()
    calls = 0
    try:
        while done < len(view):
            calls += 1
            try:
                n = os.preadv(fd, [view[done:]], offset + done, flags)
            except BlockingIOError:
                break
            except OSError as exc:
                if not flags or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _nowait_works, flags = False, 0
                continue
            if n <= 0:
                break
            done += n
    finally:
        READ_PROFILE.add(pread_calls=calls, pread_bytes=done,
                         pread_seconds=time.perf_counter() - started)  # fmt: skip
    return done


open_files: weakref.WeakSet[CvmfsFile] = weakref.WeakSet()
open_files_lock = threading.Lock()


def open_piece(path: Path) -> int:
    """Open a piece's cache file; out of descriptors, close the idle ones of every open file
    of this process and try again. Why: each file keeps up to :attr:`CvmfsFile.max_open_pieces`
    open, and a mount serves every job of a node (sixty files read at once under a limit of 80
    failed with EMFILE)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    release_idle_descriptors()
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def release_idle_descriptors() -> None:
    """Close the pieces no read is using, in every open file of this process."""
    with open_files_lock:
        handles = list(open_files)
    for handle in handles:
        handle.close_idle()


def drop_files(paths: list[Path]) -> None:
    for path in paths:
        drop_cached_pages(path)  # a file evicted meanwhile has nothing left to drop


_devnull = -1


def page_in(fd: int, size: int) -> None:
    """Bring ``size`` bytes of a file into the page cache without copying them anywhere.

    ``sendfile`` to ``/dev/null`` runs the kernel's ordinary read-ahead and discards the pages
    in the kernel; where a file system refuses it, ``posix_fadvise(WILLNEED)`` instead.
    """
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    done = 0
    try:
        while done < size:
            n = os.sendfile(_devnull, fd, done, size - done)
            if n <= 0:
                return
            done += n
    except OSError:
        os.posix_fadvise(fd, done, 0, os.POSIX_FADV_WILLNEED)
