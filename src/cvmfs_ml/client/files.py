"""Files of a repository as readers see them: a regular file's layout (:class:`FileLayout`)
and a seekable, thread-safe handle over its cached pieces (:class:`CvmfsFile`).

The handle reads pieces from the object cache with ``pread``/``preadv`` straight into the
caller's buffer; pieces it lacks come from :meth:`Repository.piece_fetch`, which fetches and
verifies them. :class:`~cvmfs_ml.client.repository.Repository` opens these.

Warm reads (pieces in the cache, not in the page cache) are paced by the disk, so a sequential
reader keeps it busy ahead of itself: when it moves on to a piece, the next pieces (up to
:attr:`CvmfsFile.disk_ahead_bytes`) are opened and paged in on a small background pool, while
the current one is served. Paged in with ``sendfile`` to ``/dev/null``: the kernel's normal
read-ahead reads the file (large folios, large I/Os) and no byte is copied. Measured on the
read benchmark's disk, ``posix_fadvise(WILLNEED)`` made I/Os of 0.8-1 MiB (it fills the page
cache with single pages, and reads at most the bdi's read-ahead size per call) against ~1.4
MiB, and the disk needed more busy time for the same bytes. Without any of it the disk idled
at every piece boundary (a new cache file starts with a small synchronous read-ahead).

:meth:`CvmfsFile.pread_nowait` reads with ``RWF_NOWAIT``, so the FUSE event loop answers only
what is in the page cache and sends the rest to a worker thread instead of blocking on the disk.

The system calls themselves (opening pieces, ``preadv``, paging in, dropping pages) are in
:mod:`.piece_io`.
"""

from __future__ import annotations

import bisect
import collections
import io
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cvmfs_ml.client.background import BackgroundPool
from cvmfs_ml.client.piece_io import (
    RWF_NOWAIT,
    drop_files,
    filled_bytes,
    open_files,
    open_files_lock,
    open_piece,
    page_in,
    preadv_full,
)
from cvmfs_ml.client.readprofile import READ_PROFILE
from cvmfs_ml.cvmfs.catalog import Chunk
from cvmfs_ml.cvmfs.objects import ObjectKind
from cvmfs_ml.errors import IntegrityError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from cvmfs_ml.client.prefetch import Fetched
    from cvmfs_ml.client.repository import Repository

__all__ = ["CvmfsFile", "FileLayout"]


@dataclass(frozen=True)
class FileLayout:
    """How a regular file's bytes are stored: pieces with their objects and compression."""

    size: int
    compressed: bool
    pieces: tuple[Chunk, ...]  # a whole-file object is one piece at offset 0
    chunked: bool = False  # pieces are ``P`` objects
    external: str | None = None  # repository path of an external file (flag 128)

    @property
    def kind(self) -> ObjectKind:
        return ObjectKind.PARTIAL if self.chunked else ObjectKind.FILE

    @property
    def offsets(self) -> list[int]:
        return [p.offset for p in self.pieces]



class CvmfsFile(io.RawIOBase):
    """A read-only, seekable view of one file; pieces come from the cache, fetched lazily.

    Safe for concurrent :meth:`pread` calls (FUSE serves one open file from many threads).
    Open piece files are kept in a small LRU; a descriptor is closed only when no read is
    using it, so a concurrent read never sees its descriptor closed (or reused) under it.
    A reader that moves sequentially from piece to piece gets the next
    ``repository.readahead_pieces`` pieces queued in the background, unless the whole file
    was queued at open (``prefetched``).
    """

    max_open_pieces = 16
    disk_ahead_bytes = 32 << 20
    """How far ahead of a sequential reader cached pieces are opened and paged in."""
    mode = "rb"

    def __init__(self, repository: Repository, path: str, layout: FileLayout) -> None:
        super().__init__()
        self.repository = repository
        self.name = path
        self.layout = layout
        self.prefetched = False
        self.drop_behind = False
        """Drop the cache files' pages of pieces whose bytes now sit in the page cache of the
        file itself (FUSE, with ``keep_cache``): read and left behind, or pushed."""
        self.close_behind = False
        """Close the pieces left behind: for a file larger than the cache can keep, whose
        first pieces are evicted while it is read, an open cache file would keep its disk
        space (a disk smaller than the quota filled up). For every reader, the mount's and
        fsspec's alike."""
        self._drop_next = 0  # pieces before this one were considered for dropping
        self.prefetching: list[Future[Fetched]] = []
        """The fetches queued for this file at open (one per distinct piece object)."""
        self.readahead = int(getattr(repository, "readahead_pieces", 0))
        self._offsets = layout.offsets
        self._pos = 0
        self._lock = threading.Lock()
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._users: dict[int, int] = {}
        self._doomed: dict[int, int] = {}
        self._last_index = -1
        self.pieces_read: set[int] = set()
        """Pieces a read has touched (the page cache push leaves those and the next ones)."""
        self._advised = -1  # the last piece given to the disk read-ahead
        self._closing = False
        with open_files_lock:
            open_files.add(self)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        return self.layout.size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.layout.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    # -- piece descriptors --------------------------------------------------------------------
    def _index(self, offset: int) -> int:
        return bisect.bisect_right(self._offsets, offset) - 1

    def is_open(self, size: int, offset: int) -> bool:
        """Whether a read of ``size`` bytes at ``offset`` needs no fetch and no cache lookup.

        The FUSE layer answers such reads on its event loop instead of a worker thread.
        """
        end = min(offset + size, self.layout.size)
        if offset >= end:
            return True
        with self._lock:
            return all(i in self._fds for i in range(self._index(offset), self._index(end - 1) + 1))

    def _acquire(self, index: int) -> tuple[int, str, int]:
        """An open descriptor of piece ``index`` (its use count raised), how, network bytes."""
        with self._lock:
            fd = self._fds.get(index)
            if fd is not None:
                self._fds.move_to_end(index)
                self._users[index] = self._users.get(index, 0) + 1
                return fd, "hit", 0
        how, net = "hit", 0
        started = time.perf_counter()
        for attempt in range(2):
            path, got_how, got_net = self.repository.piece_fetch(self.layout, index)
            if got_how != "hit":
                how, net = "fetch", net + got_net
            try:
                fd = open_piece(path)
                break
            except FileNotFoundError:  # evicted between lookup and open: look it up again
                if attempt:
                    raise
        if how == "hit":
            READ_PROFILE.add(lookup_count=1, lookup_seconds=time.perf_counter() - started)
        return self._adopt(index, fd), how, net

    def _acquire_open(self, index: int) -> int | None:
        """The descriptor of piece ``index`` if it is open (use count raised), else ``None``."""
        with self._lock:
            fd = self._fds.get(index)
            if fd is not None:
                self._fds.move_to_end(index)
                self._users[index] = self._users.get(index, 0) + 1
            return fd

    def _adopt(self, index: int, fd: int) -> int:
        """Keep a newly opened descriptor of piece ``index`` (use count raised); return the one
        in use (another reader's, when it opened the piece meanwhile)."""
        with self._lock:
            if self._closing:  # the disk read-ahead lost a race with close()
                os.close(fd)
                raise ValueError("I/O operation on closed file")
            existing = self._fds.get(index)
            if existing is not None:  # another reader opened it meanwhile
                os.close(fd)
                fd = existing
                self._fds.move_to_end(index)
            else:
                self._fds[index] = fd
            self._users[index] = self._users.get(index, 0) + 1
            self._close_idle()
        return fd

    def _release(self, index: int) -> None:
        with self._lock:
            left = self._users.get(index, 0) - 1
            if left > 0:
                self._users[index] = left
            else:
                self._users.pop(index, None)
                doomed = self._doomed.pop(index, None)
                if doomed is not None:
                    os.close(doomed)
            self._close_idle()

    def _close_idle(self) -> None:
        """Close least recently used descriptors beyond the limit that no read is using."""
        excess = len(self._fds) - self.max_open_pieces
        if excess <= 0:
            return
        for index in [i for i in self._fds if i not in self._users][:excess]:
            os.close(self._fds.pop(index))

    def close_idle(self, indexes: Iterable[int] | None = None) -> None:
        """Close the descriptors of pieces ``indexes`` (default: all) that no read is using."""
        with self._lock:
            for index in list(self._fds if indexes is None else indexes):
                if index in self._fds and index not in self._users:
                    os.close(self._fds.pop(index))

    def _drop(self, index: int) -> None:
        """Forget a piece's descriptor (its cache file was bad); closed once no read uses it."""
        with self._lock:
            fd = self._fds.pop(index, None)
            if fd is None:
                return
            if index in self._users:
                self._doomed[index] = fd
            else:
                os.close(fd)

    def _note_piece(self, index: int) -> None:
        """Queue read-ahead (network and disk) when a reader moves on to the next piece."""
        last, self._last_index = self._last_index, index
        self.pieces_read.add(index)
        if (self.drop_behind or self.close_behind) and index > last:
            self._drop_left_behind(index)
        if index == last or not (index == last + 1 or (last < 0 and index == 0)):
            return
        self._disk_ahead(index)
        if self.prefetched or self.readahead <= 0:
            return
        self.repository.prefetcher.read_ahead(self.layout, index, self.readahead, self.name)

    def _drop_left_behind(self, index: int) -> None:
        """Drop the cache files of pieces that were read and lie :data:`DROP_BEHIND_PIECES` or
        more behind ``index`` (each piece is considered once; unread ones are kept)."""
        limit = index - DROP_BEHIND_PIECES
        start = self._drop_next
        if limit < start:
            return
        self._drop_next = limit + 1
        read = self.pieces_read
        behind = [i for i in range(start, limit + 1) if i in read]
        if self.close_behind:
            self.close_idle(behind)
        if self.drop_behind:
            self.drop_pages(behind)

    def drop_pages(self, indexes: list[int]) -> None:
        """Take the cache files of pieces ``indexes`` out of the page cache, on a background
        thread (their writeback is waited for first: :func:`drop_cached_pages`)."""
        if indexes:
            paths = [self.repository.cache.path_of(self.layout.pieces[i].digest) for i in indexes]
            _advise_pool().submit(drop_files, paths)

    def _disk_ahead(self, index: int) -> None:
        """Have the kernel read cached pieces after ``index`` (and ``index`` itself at the
        start) from disk now, up to :attr:`disk_ahead_bytes` ahead of the reader."""
        pieces = self.layout.pieces
        first = max(index + 1 if index else 0, self._advised + 1)
        ahead = sum(p.size for p in pieces[index + 1 : first])
        stop = first
        while stop < len(pieces) and (stop == first or ahead < self.disk_ahead_bytes):
            ahead += pieces[stop].size
            stop += 1
        if stop <= first or self.disk_ahead_bytes <= 0:
            return
        self._advised = stop - 1
        _advise_pool().submit(self._advise, range(first, stop))

    def _advise(self, indexes: range) -> None:
        """Open cached pieces (no fetch: the prefetcher does that) and page them in."""
        for index in indexes:
            if self.closed:
                return
            fd = self._acquire_open(index)
            if fd is None:
                piece = self.layout.pieces[index]
                if self.layout.external is not None or not self.repository.cache.contains(
                    piece.digest
                ):
                    continue
                try:
                    fd, _, _ = self._acquire(index)
                except Exception:  # advice only: the reader will meet the error itself
                    continue
            try:
                size = self.layout.pieces[index].size
                with READ_PROFILE.timing("advise", "advise_pieces", size):
                    page_in(fd, size)
            except OSError:
                pass
            finally:
                self._release(index)

    # -- reading ------------------------------------------------------------------------------
    def _span(self, size: int, offset: int) -> int:
        """The end of a read of ``size`` bytes at ``offset`` (clamped at the end of file)."""
        if offset < 0:
            raise OSError(22, "negative read offset")
        return min(offset + max(0, size), self.layout.size)

    def _read_span(
        self, offset: int, end: int, into: memoryview | None, *, nowait: bool = False
    ) -> list[bytes] | None:
        """Read ``[offset, end)`` piece by piece: into ``into`` (returns ``[]``) or as bytes.

        Each piece's bytes come from its verified cache file with one ``pread``/``preadv``
        straight into the destination, so a large ``readinto`` costs one copy, not three.
        ``nowait`` (with ``into``) reads only open pieces and only what the page cache holds
        (``RWF_NOWAIT``): it returns ``None`` instead of looking up a piece or waiting for the
        disk, and the caller retries without it.
        """
        started = time.monotonic()
        parts: list[bytes] = []
        source, net = "hit", 0
        pos = offset
        while pos < end:
            index = self._index(pos)
            piece = self.layout.pieces[index]
            within = pos - piece.offset
            want = min(end - pos, piece.size - within)
            if nowait:
                fd = self._acquire_open(index)
                if fd is None:
                    return None
                how, got = "hit", 0
            else:
                fd, how, got = self._acquire(index)
            try:
                if into is None:
                    with READ_PROFILE.timing("pread", "pread_calls", want):
                        data = os.pread(fd, want, within)
                    n = len(data)
                else:
                    dest = into[pos - offset : pos - offset + want]
                    n = preadv_full(fd, dest, within, RWF_NOWAIT if nowait else 0)
                if n != want and not nowait:  # this copy, not a fresh one stored meanwhile
                    self.repository.cache.invalidate(piece.digest, os.fstat(fd))
            finally:
                self._release(index)
            if n != want:
                if nowait:  # not (all) in the page cache, or short: the blocking path decides
                    return None
                self._drop(index)
                raise IntegrityError(f"{self.name} piece {index}", f"{want} bytes", f"{n} bytes")
            if how != "hit":
                source, net = "fetch", net + got
            self._note_piece(index)
            if into is None:
                parts.append(data)
            pos += want
        tracer = self.repository.tracer
        if tracer is not None:
            tracer.record(
                self.name,
                offset,
                end - offset,
                time.monotonic() - started,
                source=source,
                net_bytes=net,
                size=self.layout.size,
            )
        return parts

    def _read_parts(self, offset: int, end: int, into: memoryview | None) -> list[bytes]:
        parts = self._read_span(offset, end, into)
        assert parts is not None  # only a nowait read gives up
        return parts

    def pread(self, size: int, offset: int) -> bytes:
        """Read ``size`` bytes at ``offset`` without moving the position (FUSE, fsspec).

        A read across pieces lands in place in the ``bytes`` it returns: a whole-file read
        holds the file once in memory, not its pieces and their join.
        """
        end = self._span(size, offset)
        if offset >= end:
            return b""
        if self._index(offset) == self._index(end - 1):
            return self._read_parts(offset, end, None)[0]
        return filled_bytes(end - offset, lambda view: self._read_parts(offset, end, view))

    def pread_buffer(self, size: int, offset: int) -> bytes | bytearray:
        """:meth:`pread` that may answer with a ``bytearray`` (one copy when pieces are crossed).

        For callers that only need the buffer protocol (the FUSE reply): a read inside one
        piece is one ``pread`` as before; a read across pieces is filled in place instead of
        read piece by piece and joined.
        """
        end = self._span(size, offset)
        if offset >= end:
            return b""
        if self._index(offset) == self._index(end - 1):
            return self._read_parts(offset, end, None)[0]
        buffer = bytearray(end - offset)
        self._read_parts(offset, end, memoryview(buffer))
        return buffer

    def pread_into(self, buffer: Any, offset: int) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; return how many (0 at end of file)."""
        view = memoryview(buffer).cast("B")
        end = self._span(len(view), offset)
        if offset >= end:
            return 0
        self._read_parts(offset, end, view)
        return end - offset

    def pread_nowait(self, buffer: Any, offset: int) -> int | None:
        """:meth:`pread_into` if it needs neither a lookup nor the disk, else ``None``.

        For the FUSE event loop: bytes in the page cache are answered there with one
        ``preadv(RWF_NOWAIT)`` per piece; anything else goes to a worker thread. Where the
        file system refuses ``RWF_NOWAIT``, open pieces are read with a plain ``preadv``.
        """
        view = memoryview(buffer).cast("B")
        end = self._span(len(view), offset)
        if offset >= end:
            return 0
        if self._read_span(offset, end, view, nowait=True) is None:
            return None
        return end - offset

    def readinto(self, buffer: Any) -> int:
        n = self.pread_into(buffer, self._pos)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all remaining by default) without an extra copy."""
        if size is None or size < 0:
            return self.readall()
        data = self.pread(size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        data = self.pread(max(0, self.layout.size - self._pos), self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for fd in [*self._fds.values(), *self._doomed.values()]:
                os.close(fd)
            self._fds.clear()
            self._doomed.clear()
            self._users.clear()
        super().close()


DROP_BEHIND_PIECES = 2
"""How far behind the reader's newest piece a piece it read leaves the page cache
(:attr:`CvmfsFile.drop_behind`): not the piece just left, whose last requests may still be
in flight (the kernel's read-ahead sends several at a time and they can finish out of order).

Why drop at all: on a mount the bytes a reader got stay in the mounted file's page cache
(``keep_cache``), so the cache files' pages hold the same bytes a second time: a 2 GiB model
took 4 GiB of page cache. Dropped, the node holds it once, and the next pieces' cache files
are written into the pages just freed, which on a VM whose host takes freed memory back
(:mod:`cvmfs_ml.bench.fresh_pages`) is much cheaper than fresh ones."""


_advise_pool = BackgroundPool("cvmfs-ml-disk-ahead", 2).get
"""The process's small pool for disk read-ahead advice and drop-behind."""
