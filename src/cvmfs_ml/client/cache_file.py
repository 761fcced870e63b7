"""A file being added to the client cache: written once, checksummed as it is written.

:class:`TxnFile` is what ``ObjectCache.put_stream`` (:mod:`cvmfs_ml.client.cache`) hands a
fetcher: the CRC-32 the cachedb records is computed from the bytes as they pass (no
second read), the file's blocks are reserved before the first write (:func:`preallocate`), and
a large file starts its writeback when it is finished, so a mount can drop its pages soon.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.client.readprofile import READ_PROFILE
from cvmfs_ml.storage.pagecache import WRITEBACK_FROM, start_writeback

__all__ = ["PREALLOCATE_MIN_BYTES", "TxnFile", "crc32", "crc_of_file", "preallocate"]

try:  # ISA-L computes the same CRC-32 about 6x faster than zlib
    from isal.isal_zlib import crc32 as _crc32_impl
except ImportError:  # pragma: no cover - isal is an optional extra
    _crc32_impl = zlib.crc32

crc32: Callable[[bytes | memoryview, int], int] = _crc32_impl
"""CRC-32 (the zlib polynomial) as recorded in the cachedb ``checksum`` column."""

_PIECE = 1 << 20  # bytes per read of a CRC pass

PREALLOCATE_MIN_BYTES = 1 << 20
"""Objects from this size on get their blocks reserved before they are written."""

_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_fallocate = _load_fallocate()


def preallocate(fd: int, size: int) -> int:
    """Reserve ``size`` bytes of blocks for ``fd`` without changing its size; bytes reserved.

    Why: a buffered write into a file without blocks makes ext4 (and xfs) reserve and map
    delayed-allocation blocks page by page, and that bookkeeping cost more CPU than the copy
    itself while the cold reads here were profiled (0.75-1.65 s per GiB against 0.2-0.7 s with
    the blocks reserved first). ``fallocate(FALLOC_FL_KEEP_SIZE)``, so a file that gets fewer
    bytes than expected keeps its true size. Best effort: file systems without it (tmpfs is
    fine, some network file systems are not) are written as before.
    """
    if _fallocate is None or size < PREALLOCATE_MIN_BYTES:
        return 0
    return size if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size) == 0 else 0


def crc_of_file(path: Path) -> int:
    started = time.perf_counter()
    value = 0
    total = 0
    view = memoryview(bytearray(_PIECE))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            value = crc32(view[:n], value)
            total += n
    READ_PROFILE.add(crc_files=1, crc_bytes=total, crc_seconds=time.perf_counter() - started)
    return value


class TxnFile:
    """A file being added to the cache: writable, seekable, checksummed as it is written.

    Sequential writes from the start update the CRC on the fly; anything else (rewriting the
    middle) makes the commit re-read the file to compute it. ``truncate(0)`` starts over, which is
    what :meth:`cvmfs_ml.client.fetcher.Fetcher.fetch_into` does before a retry.
    """

    def __init__(self, path: Path, size_hint: int | None = None) -> None:
        self.path = path
        self.committed_path: Path | None = None
        # Unbuffered: the fetcher writes 1 MiB blocks, which a buffer would only copy again.
        self._file: BinaryIO = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by the cache
        self._reserved = preallocate(self._file.fileno(), size_hint or 0)
        self._pos = 0
        self._crc = 0
        self._crc_end = 0
        self._crc_valid = True

    # the io-like surface the fetcher and callers use
    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = 0
        while n < len(view):  # an unbuffered write may be short
            n += self._file.write(view[n:]) or 0
        if self._crc_valid and self._pos == self._crc_end:
            self._crc = crc32(view, self._crc)
            self._crc_end += n
        else:
            self._crc_valid = False
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._file.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._file.truncate(size)
        if size == 0:
            self._crc, self._crc_end, self._crc_valid = 0, 0, True
            self._reserved = preallocate(self._file.fileno(), self._reserved)  # a retry
        elif size < self._crc_end:
            self._crc_valid = False
        return size

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def _finish(self) -> tuple[int, int]:
        """Flush and close; return (size, crc) of what was written."""
        self._file.flush()
        size = os.fstat(self._file.fileno()).st_size
        if self._reserved > size:  # fewer bytes came than reserved: free the rest
            os.ftruncate(self._file.fileno(), size)
        if size >= WRITEBACK_FROM:  # on disk soon, so its pages can be dropped soon
            start_writeback(self._file.fileno())
        self._file.close()
        if not self._crc_valid or self._crc_end != size:
            return size, crc_of_file(self.path)
        return size, self._crc

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
