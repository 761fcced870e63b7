"""Objects into the cache, verified, each fetched once however many readers ask at a time.

A FUSE daemon serves one file from many threads and prefetches its pieces on others: when two
of them want the same object, one fetches it (streaming straight into a cache file, verified
while it streams, bounded by what the catalog says) and the others wait for that fetch instead
of starting their own. :class:`FetchOnce` holds that in-flight table and reports, for traces,
how each request was served and how many bytes it moved.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from errno import EMFILE, ENFILE
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.piece_io import release_idle_descriptors
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import MAX_UNSIZED_OBJECT, ObjectKind, object_path
from cvmfs_ml.errors import CacheFullError, FormatError, IntegrityError, is_disk_full
from cvmfs_ml.storage.base import ObjectSource

__all__ = ["FetchInto", "FetchOnce"]

FetchInto = Callable[[BinaryIO, "int | None"], int]
"""``fetch_into(sink, max_bytes) -> bytes written``: an object from somewhere else than the
source's ``data/`` (external files)."""


class FetchOnce:
    """Fetches objects of ``source`` into ``cache``; ``count(name)`` counts hits and misses."""

    max_unsized_object = MAX_UNSIZED_OBJECT
    """Bound on objects no catalog gives a size for (root catalog, history, meta-info)."""

    def __init__(
        self, source: ObjectSource, cache: ObjectCache, count: Callable[[str], None]
    ) -> None:
        self.source = source
        self.cache = cache
        self._count = count
        self._lock = threading.Lock()
        self._inflight: dict[Digest, Future[Path]] = {}
        self._net_claimed = 0  # the fetcher's byte counter already attributed to fetches

    def get(
        self,
        digest: Digest,
        kind: ObjectKind,
        compressed: bool,
        size: int | None = None,
        fetch_into: FetchInto | None = None,
        *,
        exact: bool = True,
        retried: bool = False,
    ) -> tuple[Path, str, int]:
        """The object's cache path and how it was served, for tracing: ``(path, how, net)``.

        ``how`` is ``"hit"`` (in the cache), ``"fetch"`` (this call fetched it; ``net`` bytes
        came over the network or out of the store) or ``"wait"`` (another thread was fetching
        it and this call waited for that fetch).

        ``size`` is what the catalog says the content is: more is refused while it streams
        (a zlib bomb, an oversized object) and, when ``exact``, less after it, before the
        cache keeps it. Without a size, :attr:`max_unsized_object` bounds it. A known size
        also reserves the cache file's blocks before the bytes arrive.
        """
        path = self.cache.get_path(digest)
        if path is not None:
            self._count("cache_hits")
            return path, "hit", 0
        self._count("cache_misses")
        with self._lock:
            future = self._inflight.get(digest)
            owner = future is None
            if owner:
                future = Future()
                self._inflight[digest] = future
        assert future is not None
        if not owner:
            try:
                return future.result(), "wait", 0
            except CacheFullError:
                if retried:
                    raise
            # The disk was full of other fetches (read-ahead) then: try it once from here.
            return self.get(digest, kind, compressed, size, fetch_into, exact=exact, retried=True)
        try:
            rel = object_path(digest, kind)
            known = size is not None and (exact or size > 0)  # a 0 catalog size is "unknown"
            bound = size if known and size is not None else self.max_unsized_object
            released = made_room = False  # each remedy is tried once
            while True:
                try:
                    path, written = self._store(digest, rel, compressed, size if exact else None,
                                                bound, known, fetch_into)  # fmt: skip
                    break
                except (OSError, sqlite3.OperationalError) as exc:
                    if getattr(exc, "errno", None) in (EMFILE, ENFILE) and not released:
                        released = True  # the cache file could not be opened
                        release_idle_descriptors()
                        continue
                    if isinstance(exc, CacheFullError) or not is_disk_full(exc):
                        raise
                    if made_room:
                        raise CacheFullError(
                            f"the cache disk {self.cache.root} is full, even after evicting "
                            f"for {rel}: free space on it, or move CVMFS_CACHE_BASE"
                        ) from exc
                    made_room = True
                    self.cache.make_room(bound if known else 0)
            future.set_result(path)
            net = self._network_bytes(rel, written) if fetch_into is None else written
            return path, "fetch", net
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)

    def _store(
        self,
        digest: Digest,
        rel: str,
        compressed: bool,
        size: int | None,
        bound: int,
        known: bool,
        fetch_into: FetchInto | None,
    ) -> tuple[Path, int]:
        """Fetch into a new cache entry (``size``: exactly that many bytes); its path, bytes."""
        with self.cache.put_stream(digest, size_hint=bound if known else None) as sink:
            if fetch_into is None:
                written = self.source.fetch_into(rel, digest, compressed, sink, max_bytes=bound)
            else:
                written = fetch_into(sink, bound)
            if size is not None and written != size:
                raise FormatError(rel, f"holds {written} bytes, the catalog says {size}")
        # Just committed (verified while it streamed): no second lookup needed.
        path = sink.committed_path or self.cache.get_path(digest)
        if path is None:
            raise IntegrityError(f"cache entry {digest.hex}", "stored", "missing")
        return path, written

    def _network_bytes(self, rel: str, written: int) -> int:
        """Bytes the fetch of ``rel`` moved: store file size, or the fetcher counter's growth.

        The HTTP fetcher counts received bytes (retries and boot files included) but not per
        call, so each fetch claims the growth since the previous claim: the total over a trace
        is exact, the split between fetches that finish at the same moment is approximate.
        """
        stats = getattr(self.source, "stats", None)
        received = getattr(stats, "bytes_received", None)
        if isinstance(received, int):
            with self._lock:
                delta = received - self._net_claimed
                self._net_claimed = max(self._net_claimed, received)
            return max(0, delta)
        local_path = getattr(self.source, "path", None)
        if callable(local_path):
            try:
                return os.stat(local_path(rel)).st_size
            except (OSError, TypeError, ValueError):
                pass
        return written

