"""File content to objects: read -> chunk -> (compress, hash, store) in parallel.

The calling thread reads each file once with ``readinto`` into blocks from a small pool and
finds chunk boundaries in them (numpy, fast; for a large file a reader thread fills the blocks
a few ahead, so reading overlaps chunking); a piece is a list of ``memoryview`` segments of
those blocks, handed to a thread pool that compresses, hashes and writes it (zlib, ISA-L,
hashlib and ``os.write`` release the GIL). Nothing is copied on the way for ``none``: the
benchmark showed fresh buffers and their page faults, not hashing, bounded the reader
(benchmarks/bench_publish.py). The pool caps the bytes in flight, so memory stays bounded
whatever the file size, and only objects the store lacks are written.

Issue 14's profile shaped three details: the kernel is asked to read large files a few blocks
ahead (``POSIX_FADV_WILLNEED``), so a cold file's reads overlap chunking and hashing; workers
hash through a small cache-resident buffer (:func:`~cvmfs_ml.cvmfs.hashing.update_staged`,
SHA-1 about 30% faster on data coming from memory); and every stage is timed into
``IngestStats.stages`` (:mod:`cvmfs_ml.publish.profile`). The local store starts each large
object around the page cache as it is written (``O_DIRECT``), so the ``syncfs`` before the
manifest swap finds little left.

Files whose size, inode and change time are those of a file already published with the same
settings are not read at all (:class:`~cvmfs_ml.publish.filecache.FileCache`).
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from cvmfs_ml.cvmfs.catalog import Chunk
from cvmfs_ml.cvmfs.chunking import Xor32Chunker
from cvmfs_ml.cvmfs.hashing import STAGING_SIZE, Digest, new_hasher, update_staged
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, new_compressor, object_path
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.filecache import FileCache, FileKey
from cvmfs_ml.publish.profile import StageClock
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.publish.streamed import stream_object
from cvmfs_ml.storage.base import ObjectStore

__all__ = ["FileContent", "IngestStats", "ContentPipeline", "PendingFile", "zlib_pays"]

_BLOCK = 8 * 2**20
_IN_FLIGHT_BYTES = 96 * 2**20  # pieces queued or being stored: the bulk of peak memory
_WHOLE_IN_MEMORY = 32 * 2**20  # an unchunked file larger than this streams through one codec
_AUTO_SAMPLE = 2**20
# A 256 KiB sample was tried (the same estimate on float16 weights and random bytes, a quarter
# of the cost): it chose zlib for bench_publish.py's content, whose `auto` publish then took
# 40.3 s against 7.95 s with `none` (a safetensors file's JSON header weighs more in a smaller
# sample: 14.5% saved in 256 KiB, 9.3% in 1 MiB). The sample stays 1 MiB, but bytes that do
# not compress at all (random, already compressed: -0.04% on 64 KiB) are told apart on its
# first 64 KiB, at 1/16 of the cost; anything else still gets the whole sample.
_AUTO_QUICK_SAMPLE = 64 * 2**10
_READ_AHEAD = 4 * _BLOCK  # bytes the kernel is asked to read ahead of the reader
_READER_DEPTH = 2  # blocks a large file's reader thread may fill ahead of the chunker


@dataclass(frozen=True)
class FileContent:
    """Where a regular file's bytes went: one object, or a list of chunks."""

    size: int
    compressed: bool
    digest: Digest | None
    chunks: tuple[Chunk, ...] = ()

    @property
    def is_chunked(self) -> bool:
        return bool(self.chunks)


@dataclass
class IngestStats:
    files: int = 0
    bytes_in: int = 0
    files_unchanged: int = 0  # skipped: known from an earlier publish, not read again
    bytes_unchanged: int = 0
    objects_new: int = 0
    objects_existing: int = 0
    bytes_stored: int = 0
    bytes_existing: int = 0  # stored size of objects the store already had (deduplicated)
    stages: StageClock = field(default_factory=StageClock, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_object(self, new: bool, size: int) -> None:
        with self._lock:
            if new:
                self.objects_new += 1
                self.bytes_stored += size
            else:
                self.objects_existing += 1
                self.bytes_existing += size


class _BlockPool:
    """Reusable read buffers, shared by the reader and the workers by reference count.

    At most ``limit`` blocks exist; the reader waits for one to come back when all are in use,
    which is what bounds memory. ``limit`` always leaves room for the two pieces the reader may
    hold at once plus the block it reads into, so in-flight pieces can always finish.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self._free: list[bytearray] = []
        self._refs: dict[int, int] = {}
        self._made = 0
        self._cv = threading.Condition()

    def take(self) -> bytearray:
        with self._cv:
            while not self._free and self._made >= self.limit:
                self._cv.wait()
            if self._free:
                block = self._free.pop()
            else:
                block = bytearray(self.size)
                self._made += 1
            self._refs[id(block)] = 1
            return block

    def ref(self, block: bytearray) -> None:
        with self._cv:
            self._refs[id(block)] += 1

    def unref(self, block: bytearray) -> None:
        with self._cv:
            count = self._refs[id(block)] - 1
            if count:
                self._refs[id(block)] = count
            else:
                del self._refs[id(block)]
                self._free.append(block)
                self._cv.notify()


@dataclass
class _Piece:
    """Bytes of one object to be: segments of pool blocks (or plain bytes) and their owners."""

    offset: int
    segments: list[memoryview | bytes] = field(default_factory=list)
    owners: list[bytearray] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.segments)


class PendingFile:
    """A file whose pieces are still being stored; :meth:`result` waits for them.

    A publish keeps one per file until the catalog is written, so once settled it keeps only
    its :class:`FileContent`: the futures (a lock and a condition each, about 1 KB) are let go.
    """

    __slots__ = ("compressed", "known", "on_done", "pieces", "size", "whole")

    def __init__(self, size: int, compressed: bool) -> None:
        self.size = size
        self.compressed = compressed
        self.whole: Future[tuple[Digest, bool]] | None = None
        self.pieces: list[tuple[int, int, Future[tuple[Digest, bool]]]] = []
        self.known: FileContent | None = None
        self.on_done: list[tuple[FileCache, FileKey]] = []

    def result(self) -> FileContent:
        if self.known is not None:
            return self.known
        if self.whole is not None:
            digest, compressed = self.whole.result()
            content = FileContent(self.size, compressed, digest)
        else:
            chunks = tuple(Chunk(off, size, fut.result()[0]) for off, size, fut in self.pieces)
            content = FileContent(self.size, self.compressed, None, chunks)
        self.known = content
        for cache, key in self.on_done:
            cache.remember(key, content)
        self.whole, self.pieces, self.on_done = None, [], []
        return content

    def done(self) -> bool:
        """Whether :meth:`result` would return (or raise) without waiting."""
        if self.known is not None:
            return True
        if self.whole is not None:
            return self.whole.done()
        return all(fut.done() for _, _, fut in self.pieces)


class ContentPipeline:
    """Turns regular files into stored objects for one transaction."""

    def __init__(
        self, store: ObjectStore, settings: PublishSettings, file_cache: FileCache | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.file_cache = file_cache
        self.stats = IngestStats()
        workers = settings.worker_count
        max_piece = settings.max_chunk_size if settings.use_chunking else _WHOLE_IN_MEMORY
        max_piece = max(max_piece, settings.min_chunk_size, _WHOLE_IN_MEMORY)
        blocks_per_piece = math.ceil(max_piece / _BLOCK) + 1
        # The reading side holds at most two pieces, the block being chunked, the blocks read
        # ahead and the one being read into: with fewer blocks the reader could wait forever.
        limit = max(_IN_FLIGHT_BYTES // _BLOCK, 2 * blocks_per_piece + 2 + _READER_DEPTH)
        self._blocks = _BlockPool(_BLOCK, limit)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cvmfs-ml-ingest")
        self._per_thread = threading.local()
        self._writing: set[str] = set()  # objects being written now, so a twin is not
        self._writing_lock = threading.Lock()

    def close(self) -> None:
        with self.stats.stages.measure("wait_workers"):
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ContentPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------
    def _staging(self) -> memoryview:
        """This worker's cache-sized buffer for :func:`update_staged`."""
        staging: memoryview | None = getattr(self._per_thread, "staging", None)
        if staging is None:
            staging = self._per_thread.staging = memoryview(bytearray(STAGING_SIZE))
        return staging

    def _store(self, parts: Sequence[memoryview | bytes], kind: ObjectKind) -> Digest:
        stages = self.stats.stages
        size = sum(len(p) for p in parts)
        with stages.measure("hash", size):
            hasher = new_hasher(self.settings.hash_algorithm)
            staging = self._staging()
            for part in parts:
                update_staged(hasher, part, staging)
            digest = Digest(self.settings.hash_algorithm, hasher.digest())
        rel = object_path(digest, kind)
        with self._writing_lock:
            claimed = rel not in self._writing
            if claimed:
                self._writing.add(rel)
        if claimed:
            try:
                # Peek before put outside the lock: on S3 it is a round trip (HEAD), and under
                # the lock it would serialise every worker.
                with stages.measure("write", size):
                    claimed = not self.store.exists(rel)
                    if claimed:
                        self.store.put_parts(rel, parts)
            finally:
                with self._writing_lock:
                    self._writing.discard(rel)
        self.stats.count_object(claimed, size)
        return digest

    def _piece_task(
        self, piece: _Piece, compression: Compression, kind: ObjectKind
    ) -> tuple[Digest, bool]:
        try:
            if compression is Compression.NONE:
                return self._store(piece.segments, kind), False
            data = piece.segments[0] if len(piece.segments) == 1 else b"".join(piece.segments)
            with self.stats.stages.measure("compress", len(data)):
                if compression is Compression.AUTO:  # small files: keep zlib only if it pays
                    packed = zlib.compress(data, 6)
                    keep = len(packed) <= len(data) * (1 - self.settings.auto_min_saving)
                    parts: list[bytes | memoryview] = [packed] if keep else [data]
                else:
                    # One compress() call over the whole piece: ISA-L's output (unlike zlib's)
                    # depends on how the input is split, and names must not.
                    compressor = new_compressor(compression)
                    parts, keep = [compressor.compress(data), compressor.flush()], True
            return self._store(parts, kind), keep
        finally:
            for block in piece.owners:
                self._blocks.unref(block)

    def _submit(
        self, piece: _Piece, compression: Compression, kind: ObjectKind
    ) -> Future[tuple[Digest, bool]]:
        try:
            return self._pool.submit(self._piece_task, piece, compression, kind)
        except BaseException:
            for block in piece.owners:
                self._blocks.unref(block)
            raise

    # -- the reading thread -------------------------------------------------------------------
    def _decide(self, sample: bytes | memoryview) -> Compression:
        """Resolve ``auto`` for a large file from a sample of its first bytes."""
        compression = self.settings.compression
        if compression is not Compression.AUTO:
            return compression
        sample = bytes(sample[:_AUTO_SAMPLE])
        if not sample:
            return Compression.ZLIB
        with self.stats.stages.measure("compress", len(sample)):
            pays = zlib_pays(sample, self.settings.auto_min_saving)
        return Compression.ZLIB if pays else Compression.NONE

    def add(self, item: SourceItem) -> PendingFile:
        """Read one regular file and queue its pieces; returns a handle to wait on."""
        assert item.open is not None
        settings = self.settings
        limit = settings.file_mbyte_limit
        if limit and item.size > limit * 2**20:
            warnings.warn(
                f"{item.path}: {item.size / 2**20:.0f} MB exceeds CVMFS_FILE_MBYTE_LIMIT={limit}",
                stacklevel=2,
            )
        self.stats.files += 1
        self.stats.bytes_in += item.size
        key = item.file_key
        if self.file_cache is not None and key is not None:
            known = self.file_cache.lookup(key, self.store)
            if known is not None:
                self.stats.files_unchanged += 1
                self.stats.bytes_unchanged += known.size
                pending = PendingFile(known.size, known.compressed)
                pending.known = known
                return pending
        params = settings.chunk_params
        with item.open() as source:
            if not settings.use_chunking or item.size <= params.min_size:
                pending = self._add_whole(source, item.size)
            else:
                pending = self._add_chunked(source, item.size)
        if self.file_cache is not None and key is not None:
            pending.on_done.append((self.file_cache, key))
        return pending

    def _read_block(
        self, source: BinaryIO, ahead: _ReadAhead | None = None
    ) -> tuple[bytearray, memoryview] | None:
        stages = self.stats.stages
        with stages.measure("wait_buffers"):
            block = self._blocks.take()
        with stages.measure("read"):
            if ahead is not None:
                ahead.advance()
            filled = _readinto_full(source, block)
            if ahead is not None:
                ahead.position += filled
        if not filled:
            self._blocks.unref(block)
            return None
        return block, memoryview(block)[:filled]

    def _add_whole(self, source: BinaryIO, size: int) -> PendingFile:
        if size > _WHOLE_IN_MEMORY:
            return self._stream_whole(source)
        piece = _Piece(0)
        while (read := self._read_block(source)) is not None:
            block, view = read
            piece.segments.append(view)
            piece.owners.append(block)  # the reference taken by take() passes to the piece
            if piece.size > _WHOLE_IN_MEMORY:
                for owner in piece.owners:
                    self._blocks.unref(owner)
                raise PublishError(f"a file of {size} bytes grew while it was being published")
        compression = self.settings.compression
        if compression is Compression.AUTO and piece.size > _AUTO_SAMPLE:
            compression = self._decide(piece.segments[0])
        pending = PendingFile(piece.size, compression is not Compression.NONE)
        pending.whole = self._submit(piece, compression, ObjectKind.FILE)
        return pending

    def _stream_whole(self, source: BinaryIO) -> PendingFile:
        """A large unchunked file (chunking off): one codec over the stream, bounded memory."""
        stages = self.stats.stages
        with stages.measure("read"):
            first = source.read(_BLOCK)
        compression = self._decide(first)

        def blocks() -> Iterator[bytes]:
            block = first
            while block:
                yield block
                with stages.measure("read"):
                    block = source.read(_BLOCK)

        digest, new, total, stored = stream_object(
            self.store, blocks(), compression, self.settings.hash_algorithm, ObjectKind.FILE,
            stages,
        )  # fmt: skip
        self.stats.count_object(new, stored)
        pending = PendingFile(total, compression is not Compression.NONE)
        done: Future[tuple[Digest, bool]] = Future()
        done.set_result((digest, compression is not Compression.NONE))
        pending.whole = done
        return pending

    def _add_chunked(self, source: BinaryIO, size: int) -> PendingFile:
        chunker = Xor32Chunker(self.settings.chunk_params)
        compression: Compression | None = None
        pending: PendingFile | None = None
        current = _Piece(0)
        held: _Piece | None = None  # the first piece, until we know it is not the only one
        position = 0
        ahead = _ReadAhead(source)

        def emit(piece: _Piece) -> None:
            nonlocal held
            assert pending is not None and compression is not None
            if held is None and not pending.pieces and pending.whole is None:
                held = piece
                return
            for ready in (held, piece):
                if ready is not None:
                    fut = self._submit(ready, compression, ObjectKind.PARTIAL)
                    pending.pieces.append((ready.offset, ready.size, fut))
            held = None

        def read() -> tuple[bytearray, memoryview] | None:
            return self._read_block(source, ahead)

        # A large file's blocks are read on a thread of their own, a few ahead: reading (a
        # download's receive and checksum, or a file's page-cache copy) overlaps chunking.
        reader = _BlockReader(read, self._blocks.unref) if size > 2 * _BLOCK else None
        try:
            for block, view in reader if reader is not None else iter(read, None):
                if compression is None:
                    compression = self._decide(view)
                    pending = PendingFile(size, compression is not Compression.NONE)
                start = 0
                with self.stats.stages.measure("chunk", len(view)):
                    cuts = chunker.feed(view)
                for cut in cuts:
                    end = cut - position
                    if end > start:
                        current.segments.append(view[start:end])
                        current.owners.append(block)
                        self._blocks.ref(block)
                    emit(current)
                    current = _Piece(cut)
                    start = end
                if start < len(view):
                    current.segments.append(view[start:])
                    current.owners.append(block)
                    self._blocks.ref(block)
                position += len(view)
                self._blocks.unref(block)  # the reader moves on; pieces keep their references
        finally:
            if reader is not None:
                reader.close()
        if pending is None or compression is None:  # the file shrank to nothing meanwhile
            compression = self._decide(b"")
            pending = PendingFile(0, compression is not Compression.NONE)
        if held is not None and not current.segments:
            current, held = held, None  # a cut exactly at EOF is no cut
        if held is None and not pending.pieces:
            # No cut before EOF: a sole piece is an ordinary unchunked file (section 7.1).
            pending.size = current.size
            pending.whole = self._submit(current, compression, ObjectKind.FILE)
            return pending
        if current.segments:
            emit(current)
        pending.size = position
        return pending


_Filled = tuple[bytearray, memoryview]  # a block from the pool and the part of it filled


class _BlockReader:
    """Fills blocks on a thread of its own, at most ``_READER_DEPTH`` ahead of the consumer.

    ``read`` returns a block and its filled view, or ``None`` at the end; its errors reach the
    consumer in order. :meth:`close` stops the thread and gives back what it read ahead.
    """

    def __init__(
        self,
        read: Callable[[], _Filled | None],
        release: Callable[[bytearray], None],
    ) -> None:
        self._read = read
        self._release = release
        self._queue: queue.Queue[_Filled | BaseException | None] = queue.Queue(_READER_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cvmfs-ml-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._read()
                self._queue.put(item)
                if item is None:
                    return
        except BaseException as exc:  # raised on the consumer's thread
            self._queue.put(exc)

    def __iter__(self) -> Iterator[_Filled]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive() or not self._queue.empty():
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, tuple):
                self._release(item[0])


class _ReadAhead:
    """Keeps the kernel reading a few blocks ahead of the reader (``POSIX_FADV_WILLNEED``).

    Without it a cold file is read in the kernel's readahead steps while the reader waits;
    asked ahead, the disk works while the reader chunks and the workers hash. Sources without
    a real file descriptor (tarball members, bytes) are read as they are.
    """

    def __init__(self, source: BinaryIO) -> None:
        try:
            self.fd: int | None = source.fileno()
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.fd = None
        self.position = 0  # where the reader is
        self.ahead = 0  # up to where the kernel was asked to read

    def advance(self) -> None:
        """Before a read: make sure the blocks after it are on their way."""
        if self.fd is None:
            return
        want = self.position + _READ_AHEAD
        if want > self.ahead:
            start = max(self.ahead, self.position)
            try:
                os.posix_fadvise(self.fd, start, want - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.fd = None
                return
            self.ahead = want


def zlib_pays(sample: bytes, min_saving: float) -> bool:
    """Whether zlib (level 1) saves at least ``min_saving`` of ``sample``: ``auto``'s estimate.

    Bytes that do not compress at all are recognised on the first 64 KiB: there, zlib saves
    less than a quarter of ``min_saving`` only on random or already compressed bytes, and the
    rest of the sample would have to save several times ``min_saving`` to change the answer.
    """
    quick = sample[:_AUTO_QUICK_SAMPLE]
    if len(sample) > len(quick) and 1 - len(zlib.compress(quick, 1)) / len(quick) < min_saving / 4:
        return False
    return 1 - len(zlib.compress(sample, 1)) / len(sample) >= min_saving


def _readinto_full(source: BinaryIO, block: bytearray) -> int:
    """Fill ``block`` as far as the file allows (``readinto`` may return short counts)."""
    view = memoryview(block)
    filled = 0
    while filled < len(block):
        count = source.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled
