"""Writing around the page cache: writeback started early, pages dropped behind the writer,
and ``O_DIRECT`` for files written once and not read back soon.

On VMs whose host takes freed memory back (free page reporting, as on Firecracker), filling
fresh pages costs several times the CPU of reused ones (``docs/benchmarks.md``). Measured here
for 1 GiB in 8 MiB blocks: ``dd oflag=direct`` 0.74-0.76 s wall with 0.07-0.08 s of system
time, ``dd conv=fdatasync`` 1.37-3.72 s with 0.81-3.19 s. Everything here is advice or has a
fallback: where a call is missing or refused, files are written through the page cache as
before, with the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "WRITEBACK_FROM",
    "DropBehind",
    "UncachedWriter",
    "drop_cached_pages",
    "start_writeback",
    "syncfs",
    "write_parts_direct",
]


def _load_libc(function: str):  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name, use_errno=True), function, None) if name else None
    except OSError:
        return None


_SYNCFS = _load_libc("syncfs")
_SYNC_FILE_RANGE = _load_libc("sync_file_range")
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
WRITEBACK_FROM = 2**20
"""Objects (and client cache files) at least this large start their writeback at once."""


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting for them.

    Only a head start: durability still comes from :meth:`LocalStore.flush` before the manifest
    swap. Without it the kernel leaves a publish's objects dirty until the end (the
    background threshold is a share of RAM), and the final ``syncfs`` then writes them all
    while nothing else happens; started early, the disk writes overlap reading and hashing.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def drop_cached_pages(path: str | os.PathLike[str]) -> bool:
    """Take the file at ``path`` out of the page cache; whether the kernel took the advice.

    ``POSIX_FADV_DONTNEED`` skips pages that are dirty or being written, so the file's
    writeback is finished first (``sync_file_range``, which waits for the data only: no
    journal commit and no device flush, unlike ``fdatasync``). Advice only: a file that is gone
    or cannot be opened is ``False``, not an error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:  # O_NOATIME needs ownership
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
    except OSError:
        return False
    try:
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                             | _SYNC_FILE_RANGE_WAIT_AFTER)  # fmt: skip
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class DropBehind:
    """Keeps a file that is written once, from start to end, out of the page cache behind the
    writer: every ``window`` bytes its writeback starts, and the range written a window before
    that is dropped once it is on disk.

    For streams nobody reads back soon (a registry's uploaded blobs): their pages are freed as
    the writing goes on and the next writes reuse them. On VMs whose host takes freed memory
    back (free page reporting, as on Firecracker), filling fresh pages costs several times the
    CPU of reused ones (``docs/benchmarks.md``): a 1 GiB file written in 4 MiB blocks took
    0.24-0.27 s of system time this way against 0.90-1.18 s, and the closing ``fsync`` found
    little left to write. Advice only: where the calls are missing or fail, the file is
    written as before.
    """

    def __init__(self, fd: int, start: int = 0, window: int = 32 * 2**20) -> None:
        self._fd = fd
        self._window = window
        self._started = start  # writeback asked for up to here
        self._dropped = start  # dropped from the page cache up to here

    def wrote(self, end: int) -> None:
        """The file now holds ``end`` bytes (written since the last call, in order)."""
        if _SYNC_FILE_RANGE is None or end - self._started < self._window:
            return
        try:
            _SYNC_FILE_RANGE(self._fd, self._started, end - self._started,
                             _SYNC_FILE_RANGE_WRITE)  # fmt: skip
            self._started = end
            behind = end - self._window  # one window stays cached, its writeback running
            if behind - self._dropped >= self._window:
                _SYNC_FILE_RANGE(self._fd, self._dropped, behind - self._dropped,
                                 _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                                 | _SYNC_FILE_RANGE_WAIT_AFTER)  # fmt: skip
                os.posix_fadvise(self._fd, self._dropped, behind - self._dropped,
                                 os.POSIX_FADV_DONTNEED)  # fmt: skip
                self._dropped = behind
        except OSError:  # advice only
            pass


def syncfs(fd: int) -> None:
    """Write everything dirty of the file system holding ``fd`` (``sync`` where not offered)."""
    if _SYNCFS is None or _SYNCFS(fd) != 0:
        os.sync()


# -- O_DIRECT ---------------------------------------------------------------------------------
_ALIGN = 4096  # O_DIRECT's alignment of memory, offsets and lengths on every common device
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_SCRATCH = 4 * 2**20
_SCRATCH_KEPT = 4  # buffers kept for reuse, whatever the number of threads that write


class _ScratchPool:
    """Page-aligned buffers for :func:`write_parts_direct`, shared by every thread.

    Reused, because on these VMs a fresh buffer's pages cost what the page cache would have;
    shared and capped, because a server's thread pools hold dozens of threads (a buffer per
    thread took a registry's peak RSS from 243 to 319 MiB).
    """

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, _SCRATCH)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _SCRATCH_KEPT:
                self._free.append(buffer)
                return
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
            buffer.close()


_scratch_pool = _ScratchPool()


def write_parts_direct(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
    """Write ``parts`` from the start of the empty file ``fd`` with ``O_DIRECT``.

    The bytes are copied through a page-aligned buffer, the last block padded and the
    file cut back to its length; ``fd`` is left without ``O_DIRECT``. ``False`` (nothing
    written) where the file system refuses ``O_DIRECT``: the caller writes as usual.

    For objects a publisher writes and nobody reads back soon: they skip the page cache (and
    its fill cost on VMs, above); the disk write happens in the call, on the caller's thread
    (4 MiB at a time), instead of in writeback later. Durability is unchanged: it still comes
    from the ``syncfs`` before the manifest swap.
    """
    if not _O_DIRECT:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    buffer = _scratch_pool.take()
    try:
        scratch, filled, offset, total = memoryview(buffer), 0, 0, 0
        for part in parts:
            view = memoryview(part).cast("B")
            total += len(view)
            while view:
                n = min(len(view), _SCRATCH - filled)
                scratch[filled : filled + n] = view[:n]
                filled, view = filled + n, view[n:]
                if filled == _SCRATCH:
                    offset = _pwrite_all(fd, scratch, offset)
                    filled = 0
        if filled:
            padded = -(-filled // _ALIGN) * _ALIGN
            scratch[filled:padded] = bytes(padded - filled)
            offset = _pwrite_all(fd, scratch[:padded], offset)
        if offset != total:
            os.ftruncate(fd, total)
        os.lseek(fd, total, os.SEEK_SET)  # where write() would have left it
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL and offset == 0:  # refused at the first write
            return False
        raise
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        scratch.release()
        _scratch_pool.give(buffer)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    return offset


def _read_tail(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of ``path`` at ``offset``, read without ``O_DIRECT`` (any alignment)."""
    with open(path, "rb", buffering=0) as handle:
        data = os.pread(handle.fileno(), length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, f"{path}: its last page could not be read back")
    return data


class UncachedWriter:
    """Writes ``path`` (created, or truncated unless ``append``) from a stream of :meth:`write`
    calls, around the page cache and off the caller's thread.

    For streams kept on disk but not read back soon: a blob that a sync stores as objects while
    it downloads (its file is a fallback and the source of a model's header), a blob pushed to
    the registry (`OciStore.appending`, with the upload's ``hasher``). In a sync of a
    1 GiB artifact, the blob file's buffered writes (with :class:`DropBehind`) cost 1.3-1.5 s
    of system time on the downloading thread, the round's bottleneck; here the caller only
    copies its bytes into page-aligned buffers, and a writer thread writes them with
    ``O_DIRECT``. The last block is written padded to the alignment and the file cut back to
    its length. Where ``O_DIRECT`` is refused (at ``open`` or at the first write), the writer
    thread writes through the page cache instead, dropping behind itself.

    ``append`` keeps what the file holds and writes after it (an upload session resumed by its
    next request); the partial page at its end is read back and written again with the new
    bytes, so the writes stay aligned. ``hasher`` (a :mod:`hashlib` object), when given, is fed
    every new byte, in order, on a thread of its own between the caller and the writer: a
    digest that would otherwise cost the caller (a server's event loop) overlaps both; it is
    complete once :meth:`close` returns. ``block`` bytes are buffered per disk write and
    ``buffers`` blocks exist: the caller waits for the writer when all are full, which bounds
    memory to ``block * buffers``. Errors of the threads are raised by the next :meth:`write`
    or by :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        block: int = 8 * 2**20,
        buffers: int = 3,
        direct: bool = True,
        mode: int = 0o644,
        append: bool = False,
        hasher: Any = None,
    ) -> None:
        if block % _ALIGN or block <= 0 or buffers < 2:
            raise ValueError("block must be a positive multiple of 4096, with 2 buffers or more")
        self.path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        flags |= 0 if append else os.O_TRUNC
        self.direct = bool(direct and _O_DIRECT)
        if self.direct:
            try:
                self._fd = os.open(self.path, flags | _O_DIRECT, mode)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if not self.direct:
            self._fd = os.open(self.path, flags, mode)
        self._block = block
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._maps = [mmap.mmap(-1, block) for _ in range(buffers)]  # page-aligned memory
        for buffer in self._maps[1:]:
            self._free.put(buffer)
        self._current = self._maps[0]
        self._size = os.fstat(self._fd).st_size  # the file's length, as written so far
        self._written = self._size - self._size % _ALIGN  # on disk, up to the partial page
        self._filled = self._size - self._written
        if self._filled:  # rewritten with what follows it, so every write stays aligned
            try:
                self._current[: self._filled] = _read_tail(self.path, self._written, self._filled)
            except OSError:
                os.close(self._fd)
                raise
        self._start = self._written  # where this writer's first write goes
        self._skip = self._filled  # bytes of the first block the hasher has seen already
        self._behind: DropBehind | None = (
            None if self.direct else DropBehind(self._fd, self._written)
        )
        self._full: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._hashed = self._full if hasher is None else queue.Queue()  # the writer's queue
        self._hasher = hasher
        self._error: BaseException | None = None
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name="uncached-writer", daemon=True)]
        if hasher is not None:
            self._threads.append(
                threading.Thread(target=self._hash_run, name="uncached-hasher", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    # -- the caller's side ------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Take ``data`` (copied: the caller may reuse its buffer at once)."""
        self._raise_pending()
        view = memoryview(data).cast("B")
        taken = len(view)
        while view:
            room = self._block - self._filled
            n = min(room, len(view))
            self._current[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self._block:
                self._hand_over()
        self._size += taken
        return taken

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        """Write what is buffered, wait for the writer thread, cut the file to its length."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._filled > self._skip and self._error is None:
                self._full.put((self._current, self._filled, self._skip))
            self._full.put(None)
            for thread in self._threads:
                thread.join()
            self._raise_pending()
            if self._written != self._size:  # the padded last block
                os.ftruncate(self._fd, self._size)
        finally:
            os.close(self._fd)
            self._maps.clear()  # unmapped once nothing views them (an error's frames may)

    def abort(self) -> None:
        """Stop writing; the file is left as it is (the caller removes it)."""
        self._error = self._error or OSError(errno.ECANCELED, "write aborted")
        try:
            self.close()
        except OSError:
            pass

    def __enter__(self) -> UncachedWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _hand_over(self) -> None:
        self._full.put((self._current, self._filled, self._skip))
        self._skip = 0
        while True:  # the next buffer, or the writer's error while waiting for one
            try:
                self._current = self._free.get(timeout=1.0)
                break
            except queue.Empty:
                if not all(thread.is_alive() for thread in self._threads):
                    self._raise_pending()
                    raise OSError(errno.EIO, f"{self.path}: the writer thread stopped") from None
        self._filled = 0

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the threads ------------------------------------------------------------------------
    def _hash_run(self) -> None:
        try:
            while (job := self._full.get()) is not None:
                buffer, length, skip = job
                try:
                    if self._error is None:
                        self._hasher.update(memoryview(buffer)[skip:length])
                except BaseException as exc:  # raised on the caller's thread
                    self._error = exc.with_traceback(None)
                self._hashed.put(job)  # the writer gives the buffer back, hashed or not
        finally:
            self._hashed.put(None)

    def _run(self) -> None:
        while (job := self._hashed.get()) is not None:
            buffer, length, _ = job
            try:
                if self._error is None:
                    self._write_block(buffer, length)
            except BaseException as exc:  # raised on the caller's thread
                self._error = exc.with_traceback(None)
            finally:
                self._free.put(buffer)

    def _write_block(self, buffer: mmap.mmap, length: int) -> None:
        view = memoryview(buffer)
        if self.direct:
            padded = -(-length // _ALIGN) * _ALIGN  # the last block only: the rest is cut off
            if padded != length:
                view[length:padded] = bytes(padded - length)
            try:
                self._write_all(view[:padded])
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL or self._written != self._start:
                    raise
                self._leave_direct()  # refused at the first write: buffered from here on
        self._write_all(view[:length])
        assert self._behind is not None
        self._behind.wrote(self._written)

    def _write_all(self, view: memoryview) -> None:
        self._written = _pwrite_all(self._fd, view, self._written)

    def _leave_direct(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        self.direct = False
        self._behind = DropBehind(self._fd, self._written)
