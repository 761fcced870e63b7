"""Objects made while a blob uploads, so that publishing it afterwards reads nothing again.

A pushed model's weights arrive as one large blob. Publishing it once the manifest is in
chunks, compresses and stores every byte again, which takes about as long as the upload did:
a push then costs twice a local publish. Here the upload's bytes also flow, as they arrive,
into the first repository's content pipeline, in a thread of their own. By the time the
manifest comes, the objects are in the store and the blob's content (its chunk list) is known
by the blob's digest. Just before the models layer publishes the laid-out folder,
:meth:`Preingest.prime` records each file made from such a blob in the publisher's file cache
(keyed by the file's inode, size and times), so the publisher takes that content instead of
reading the file.

Whatever goes wrong is only a cache miss, and the publish reads the file as it always did: a
restart (sessions are in memory), a blob not fed from its first byte, a feed that fell too far
behind, a garbage collection in between (the cache checks every object is still stored), a
transaction of that repository starting meanwhile (taking the lock clears the staging folder,
where the pipeline's objects are being written: the write fails, the feed stops).
Blobs that look like tarballs (gzip, zstd or tar headers) are not fed: those layers are
unpacked, not published as one file. Objects of blobs never published are garbage, which the
next cleanup's collection removes.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmfs_ml.publish.filecache import remember_laid_out
from cvmfs_ml.publish.ingest import ContentPipeline, FileContent
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.publish.sources import SourceItem

__all__ = ["Preingest"]

log = logging.getLogger("cvmfs_ml.registry")

FEED_BYTES = 16 * 2**20  # received but not yet read by the pipeline: the bound on its memory
FEED_STALL_SECONDS = 10.0  # a feed blocked this long is given up...
IDLE_SECONDS = 60.0  # ...and so is an upload with no new bytes for this long (the client left)
MAX_SESSIONS = 1  # uploads fed at once: each holds up to FEED_BYTES + the pipeline's blocks
KEEP_FINISHED = 256  # finished blobs remembered (digest -> content)
_PACKED_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00")


class _Abandoned(Exception):
    """The feed was given up; the reading pipeline stops."""


class _Feed(io.RawIOBase):
    """Bytes handed over from the event loop to the pipeline's reading thread."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: collections.deque[memoryview] = collections.deque()
        self.held = 0
        self._cond = threading.Condition()
        self._ended = False
        self.aborted = False

    def readable(self) -> bool:
        return True

    def put(self, chunk: bytes) -> None:
        with self._cond:
            self._chunks.append(memoryview(chunk))
            self.held += len(chunk)
            self._cond.notify_all()

    def end(self, *, abort: bool = False) -> None:
        with self._cond:
            self._ended = True
            self.aborted = self.aborted or abort
            if abort:
                self._chunks.clear()
                self.held = 0
            self._cond.notify_all()

    def readinto(self, buffer: Any) -> int:
        with self._cond:
            while not self._chunks and not self._ended:
                if not self._cond.wait(IDLE_SECONDS):
                    self.aborted = True
                    break
            if self.aborted:
                raise _Abandoned
            if not self._chunks:
                return 0
            chunk = self._chunks[0]
            count = min(len(buffer), len(chunk))
            buffer[:count] = chunk[:count]
            if count == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[count:]
            self.held -= count
            return count


class _Session:
    """One blob upload being fed into a pipeline by a thread of its own."""

    def __init__(self, publisher: Publisher) -> None:
        self.feed = _Feed()
        self.offset = 0
        self.content: FileContent | None = None
        self._publisher = publisher
        self._thread = threading.Thread(target=self._run, name="registry-preingest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        settings = self._publisher.settings
        # The size only steers add() to the chunked path, as the publisher's own add() takes
        # for any file over the minimum chunk size (the only files whose content is kept).
        size = settings.chunk_params.min_size + 1
        item = SourceItem("/preingest", stat.S_IFREG | 0o644, 0, size=size, open=lambda: self.feed)
        try:
            with ContentPipeline(self._publisher.store, settings) as pipeline:
                content = pipeline.add(item).result()
            # To disk now, alongside the upload: the commit's own flush then has little left.
            self._publisher.store.flush()
            self.content = content
        except _Abandoned:
            pass
        except Exception as exc:  # only an optimisation: the publish reads the file instead
            log.warning("pre-ingest of an upload failed: %s", exc)

    def wait(self, timeout: float) -> FileContent | None:
        self._thread.join(timeout)
        return None if self._thread.is_alive() or self.feed.aborted else self.content


class Preingest:
    """Feeds uploads into the first repository's object store while they arrive."""

    def __init__(self, publisher: Publisher, wanted: Callable[[], bool] = lambda: True) -> None:
        self.publisher = publisher
        self._wanted = wanted
        self._lock = threading.Lock()
        self._active: dict[str, _Session] = {}
        self._finished: collections.OrderedDict[str, _Session] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.publisher.settings.use_chunking and self._wanted()

    async def feed(self, upload_id: str, offset: int, chunk: bytes) -> None:
        """``chunk`` was written at ``offset`` of upload ``upload_id``; waits (without blocking
        the event loop) while the pipeline is more than :data:`FEED_BYTES` behind."""
        with self._lock:
            session = self._active.get(upload_id)
            if session is None and offset == 0 and self.enabled and not _packed(chunk):
                for gone in [k for k, s in self._active.items() if s.feed.aborted]:
                    del self._active[gone]  # left idle by a client that went away
                if len(self._active) < MAX_SESSIONS:  # memory stays bounded: others go unfed
                    session = self._active[upload_id] = _Session(self.publisher)
        if session is None:
            return
        if session.offset != offset:  # not fed from the start (a restart): give up
            self.abort(upload_id)
            return
        session.feed.put(chunk)
        session.offset += len(chunk)
        deadline = time.monotonic() + FEED_STALL_SECONDS
        while session.feed.held > FEED_BYTES and not session.feed.aborted:
            if time.monotonic() > deadline:
                log.info("pre-ingest of upload %s fell behind; the publish will read it", upload_id)
                self.abort(upload_id)
                return
            await asyncio.sleep(0.002)

    def finish(self, upload_id: str, digest: str, size: int) -> None:
        """The upload became blob ``digest`` of ``size`` bytes (its digest checked)."""
        with self._lock:
            session = self._active.pop(upload_id, None)
            if session is None:
                return
            if session.offset != size or size <= self.publisher.settings.chunk_params.min_size:
                session.feed.end(abort=True)
                return
            session.feed.end()
            self._finished[digest] = session
            self._finished.move_to_end(digest)
            while len(self._finished) > KEEP_FINISHED:
                self._finished.popitem(last=False)[1].feed.end(abort=True)

    def abort(self, upload_id: str) -> None:
        with self._lock:
            session = self._active.pop(upload_id, None)
        if session is not None:
            session.feed.end(abort=True)

    def close(self) -> None:
        with self._lock:
            sessions = [*self._active.values(), *self._finished.values()]
            self._active.clear()
            self._finished.clear()
        for session in sessions:
            session.feed.end(abort=True)

    def prime(self, folder: Path, source: dict[str, Any], timeout: float = 600.0) -> int:
        """Before ``folder`` (laid out from ``source``'s layers) is published: tell the file
        cache what each file made from a fed blob became. Returns how many files it told."""
        if source.get("subpath"):
            return 0
        started = time.monotonic()
        files: list[tuple[Path, FileContent]] = []
        for layer in source.get("layers") or []:
            if layer.get("as") != "file":
                continue
            with self._lock:
                session = self._finished.get(str(layer.get("digest")))
            content = session.wait(timeout) if session is not None else None
            if content is not None:
                files.append((Path(folder) / str(layer["path"]), content))
        primed = remember_laid_out(self.publisher.file_cache_path, self.publisher.settings, files)
        if primed:
            log.info("%d file(s) of %s stored while uploading (waited %.2f s for the last)",
                     primed, source.get("reference"), time.monotonic() - started)  # fmt: skip
        return primed


def _packed(first: bytes) -> bool:
    """A compressed stream or a tarball: a layer to unpack, not a file to publish whole."""
    return first.startswith(_PACKED_MAGIC) or first[257:262] == b"ustar"
