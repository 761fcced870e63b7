"""File content to objects: read -> chunk -> (compress, hash, store) in parallel.

The calling thread reads each file once, in blocks, and finds chunk boundaries (numpy, fast);
every finished piece goes to a thread pool that compresses, hashes and writes it (zlib, hashlib
and file writes release the GIL). A semaphore bounds the pieces in flight, so memory stays
bounded by ``(2 * workers + 2) * max_chunk_size`` whatever the file size. Only objects the store
lacks are written.
"""

from __future__ import annotations

import threading
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from cvmfs_ml.cvmfs.catalog import Chunk
from cvmfs_ml.cvmfs.chunking import Xor32Chunker
from cvmfs_ml.cvmfs.hashing import Digest, new_hasher
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, new_compressor, object_path
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.storage.local import LocalStore

__all__ = ["ContentPipeline", "FileContent", "IngestStats"]

_BLOCK = 8 * 2**20
_WHOLE_IN_MEMORY = 64 * 2**20  # unchunked files up to this size are handled as one piece
_AUTO_SAMPLE = 2**20


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
    objects_new: int = 0
    objects_existing: int = 0
    bytes_stored: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_object(self, new: bool, size: int) -> None:
        with self._lock:
            if new:
                self.objects_new += 1
                self.bytes_stored += size
            else:
                self.objects_existing += 1


class PendingFile:
    """A file whose pieces are still being stored; :meth:`result` waits for them."""

    def __init__(self, size: int, compressed: bool) -> None:
        self.size = size
        self.compressed = compressed
        self.whole: Future[tuple[Digest, bool]] | None = None
        self.pieces: list[tuple[int, int, Future[tuple[Digest, bool]]]] = []

    def result(self) -> FileContent:
        if self.whole is not None:
            digest, compressed = self.whole.result()
            return FileContent(self.size, compressed, digest)
        chunks = tuple(Chunk(off, size, fut.result()[0]) for off, size, fut in self.pieces)
        return FileContent(self.size, self.compressed, None, chunks)


class ContentPipeline:
    """Turns regular files into stored objects for one transaction."""

    def __init__(self, store: LocalStore, settings: PublishSettings) -> None:
        self.store = store
        self.settings = settings
        self.stats = IngestStats()
        workers = settings.worker_count
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cvmfs-ml-ingest")
        self._slots = threading.BoundedSemaphore(2 * workers + 2)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ContentPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------
    def _store(self, stored: bytes | memoryview, kind: ObjectKind) -> Digest:
        hasher = new_hasher(self.settings.hash_algorithm)
        hasher.update(stored)
        digest = Digest(self.settings.hash_algorithm, hasher.digest())
        rel = object_path(digest, kind)
        new = not self.store.exists(rel)
        if new:
            self.store.put_bytes(rel, bytes(stored))
        self.stats.count_object(new, len(stored))
        return digest

    def _piece_task(
        self, data: bytes, compression: Compression, kind: ObjectKind
    ) -> tuple[Digest, bool]:
        if compression is Compression.AUTO:  # small files: keep zlib only if it pays
            packed = zlib.compress(data, 6)
            if len(packed) <= len(data) * (1 - self.settings.auto_min_saving):
                return self._store(packed, kind), True
            return self._store(data, kind), False
        if compression is Compression.NONE:
            return self._store(data, kind), False
        compressor = new_compressor(compression)
        return self._store(compressor.compress(data) + compressor.flush(), kind), True

    def _submit(
        self, data: bytes, compression: Compression, kind: ObjectKind
    ) -> Future[tuple[Digest, bool]]:
        self._slots.acquire()
        try:
            future = self._pool.submit(self._piece_task, data, compression, kind)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    # -- the reading thread -------------------------------------------------------------------
    def _decide(self, sample: bytes) -> Compression:
        """Resolve ``auto`` for a large file from a sample of its first bytes."""
        compression = self.settings.compression
        if compression is not Compression.AUTO:
            return compression
        sample = sample[:_AUTO_SAMPLE]
        if not sample:
            return Compression.ZLIB
        saving = 1 - len(zlib.compress(sample, 1)) / len(sample)
        return Compression.ZLIB if saving >= self.settings.auto_min_saving else Compression.NONE

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
        params = settings.chunk_params
        with item.open() as source:
            if not settings.use_chunking or item.size <= params.min_size:
                return self._add_whole(source, item.size)
            return self._add_chunked(source, item.size)

    def _add_whole(self, source: BinaryIO, size: int) -> PendingFile:
        if size <= _WHOLE_IN_MEMORY:
            data = source.read()
            compression = self.settings.compression
            if compression is Compression.AUTO and len(data) > _AUTO_SAMPLE:
                compression = self._decide(data)
            pending = PendingFile(len(data), compression is not Compression.NONE)
            pending.whole = self._submit(data, compression, ObjectKind.FILE)
            return pending
        # A large unchunked file streams through one compressor (chunking off): bounded memory.
        first = source.read(_BLOCK)
        compression = self._decide(first)
        compressor = new_compressor(compression)
        hasher = new_hasher(self.settings.hash_algorithm)
        writer = self.store.object_writer()
        block, total = first, 0
        while block:
            total += len(block)
            out = compressor.compress(block)
            hasher.update(out)
            writer.write(out)
            block = source.read(_BLOCK)
        tail = compressor.flush()
        hasher.update(tail)
        writer.write(tail)
        digest = Digest(self.settings.hash_algorithm, hasher.digest())
        new = writer.commit(object_path(digest))
        self.stats.count_object(new, writer.size)
        pending = PendingFile(total, compression is not Compression.NONE)
        done: Future[tuple[Digest, bool]] = Future()
        done.set_result((digest, compression is not Compression.NONE))
        pending.whole = done
        return pending

    def _add_chunked(self, source: BinaryIO, size: int) -> PendingFile:
        chunker = Xor32Chunker(self.settings.chunk_params)
        buffer = bytearray()
        start = 0  # file offset of buffer[0]
        held: tuple[int, bytes] | None = None  # the first piece, until we know it is not alone
        compression: Compression | None = None
        pending: PendingFile | None = None

        def emit(offset: int, piece: bytes) -> None:
            nonlocal held
            assert pending is not None and compression is not None
            if held is not None:
                held_offset, held_piece = held
                fut = self._submit(held_piece, compression, ObjectKind.PARTIAL)
                pending.pieces.append((held_offset, len(held_piece), fut))
                held = None
            fut = self._submit(piece, compression, ObjectKind.PARTIAL)
            pending.pieces.append((offset, len(piece), fut))

        while block := source.read(_BLOCK):
            if compression is None:
                compression = self._decide(block)
                pending = PendingFile(size, compression is not Compression.NONE)
            cuts = chunker.feed(block)
            buffer += block
            for cut in cuts:
                piece = bytes(buffer[: cut - start])
                del buffer[: cut - start]
                if held is None and not pending.pieces:  # type: ignore[union-attr]
                    held = (start, piece)
                else:
                    emit(start, piece)
                start = cut
        if pending is None or compression is None:  # the file shrank to nothing meanwhile
            compression = self._decide(b"")
            pending = PendingFile(0, compression is not Compression.NONE)
        if held is not None and not buffer:
            buffer, start, held = bytearray(held[1]), held[0], None
        if held is None and not pending.pieces:
            # No cut before EOF: a sole piece is an ordinary unchunked file (§7.1).
            pending.size = len(buffer)
            pending.whole = self._submit(bytes(buffer), compression, ObjectKind.FILE)
            return pending
        if buffer:
            emit(start, bytes(buffer))
        pending.size = start + len(buffer)
        return pending
