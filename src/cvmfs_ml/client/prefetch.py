"""Fetch file pieces ahead of the reader, in parallel, so a cold load approaches link speed.

A model load reads one large file (or a few) end to end or through mmap page faults. Fetching
its pieces one at a time, when the reader asks, costs one round trip per piece and leaves the
link idle while each piece is verified and inflated (performance-notes.md takeaway 3: 0.5 GB/s
one at a time against 1.1-1.6 GB/s with 4-8 in flight at 20 ms RTT). So:

* opening a large file queues all its pieces (``Repository.open_file``, FUSE ``open``);
* a file read sequentially without that (small files, ``prefetch=False``) gets a read-ahead of
  the next few pieces each time the reader enters a new piece (``CvmfsFile``);
* ``prefetch(path)`` / ``cvmfs-ml warm`` fetch a whole model folder in one call.

All of them go through one :class:`Prefetcher` per repository: a bounded pool of worker threads
shared by every open file (so concurrency stays at the configured number however many files are
open) that never queues the same object twice.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cvmfs_ml.client.files import DROP_BEHIND_PIECES
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.errors import ConfigError, CvmfsMlError

if TYPE_CHECKING:
    from cvmfs_ml.client.files import CvmfsFile
    from cvmfs_ml.client.repository import FileLayout, Repository
    from cvmfs_ml.cvmfs.catalog import DirectoryEntry

__all__ = ["Fetched", "Prefetcher", "WarmResult", "fit_window", "warm"]


def fit_window(handle: CvmfsFile, quota: int) -> None:
    """Read a file over half of what the cache holds (``quota``, what eviction keeps) through a
    window: queued whole, it would evict its first pieces for its last. The window is an eighth
    of the quota, fitting in half of it with the pieces still open behind the reader
    (:data:`~cvmfs_ml.client.files.DROP_BEHIND_PIECES`); the pieces left behind are closed."""
    largest = max([1, *(piece.size for piece in handle.layout.pieces)])
    wanted = max(handle.readahead, (quota // 8) // largest)
    fits = (quota // 2) // largest - DROP_BEHIND_PIECES
    handle.readahead, handle.close_behind = max(1, min(wanted, fits)), True


class Fetched(NamedTuple):
    """A piece in the cache and how it got there: ``how`` is hit, fetch or wait."""

    path: Path
    how: str
    net_bytes: int
    index: int = -1  # the piece of the layout it was fetched for


@dataclass(frozen=True)
class WarmResult:
    """What :func:`warm` did: files and bytes covered, pieces fetched, time taken."""

    files: int
    bytes: int
    pieces: int
    fetched: int
    net_bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes of files made local per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class Prefetcher:
    """Queues piece fetches on a bounded pool; one queued fetch per object at a time.

    ``pool`` is shared (the repository's); when ``None`` a private pool of ``workers`` threads
    is made and :meth:`close` shuts it down.
    """

    recent_limit = 16384
    """Objects remembered as recently cached (reader-driven prefetches skip them)."""

    def __init__(
        self, repository: Repository, pool: Executor | None = None, *, workers: int = 8
    ) -> None:
        self.repository = repository
        self._own_pool = pool is None
        self._pool: Executor = pool or ThreadPoolExecutor(
            max(1, workers), thread_name_prefix="cvmfs-ml-prefetch"
        )
        self._lock = threading.Lock()
        self._pending: dict[Digest, Future[Fetched]] = {}
        self._recent: collections.OrderedDict[Digest, None] = collections.OrderedDict()

    def close(self) -> None:
        if self._own_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Objects queued or being fetched right now."""
        with self._lock:
            return len(self._pending)

    def fetch_pieces(
        self,
        layout: FileLayout,
        indices: Iterable[int] | None = None,
        *,
        path: str | None = None,
        page_in: bool = False,
    ) -> list[Future[Fetched]]:
        """Queue pieces of one file (all by default); returns one future per distinct object.

        ``path`` names the file in trace records of the fetches. A piece whose object is
        already queued (by this file or another) shares that future. After the pool was shut
        down (repository closed) nothing is queued and the list is empty. ``page_in`` is for
        a reader about to read the pieces (the reader's handle pages cached pieces in from
        disk itself, a bounded window ahead: :mod:`cvmfs_ml.client.files`). Such reader-driven
        calls skip objects this prefetcher recently found or put in the cache (a loader that
        opens one file once per tensor, like onnxruntime, would otherwise queue every piece
        again at each open), as long as their cache file is still there.
        """
        wanted = range(len(layout.pieces)) if indices is None else indices
        futures: list[Future[Fetched]] = []
        seen: set[Digest] = set()
        for index in wanted:
            if not 0 <= index < len(layout.pieces):
                continue
            digest = layout.pieces[index].digest
            if digest in seen:
                continue
            seen.add(digest)
            created = False
            if page_in and digest in self._recent and self._still_cached(digest):
                continue
            with self._lock:
                future = self._pending.get(digest)
                if future is None:
                    try:
                        future = self._pool.submit(self._fetch_one, layout, index, path, page_in)
                    except RuntimeError:  # pool shut down: the repository is closing
                        return futures
                    self._pending[digest] = future
                    created = True
            if created:  # outside the lock: the callback may run right here
                future.add_done_callback(lambda f, d=digest: self._forget(d, f))
            futures.append(future)
        return futures

    def _still_cached(self, digest: Digest) -> bool:
        """Whether a recently cached object's file is still there (one ``stat``, no lookup)."""
        try:
            return os.path.exists(self.repository.cache.path_of(digest))
        except (AttributeError, TypeError, ValueError):
            return False

    def _forget(self, digest: Digest, future: Future[Fetched] | None = None) -> None:
        with self._lock:
            self._pending.pop(digest, None)
            if future is not None and not future.cancelled() and future.exception() is None:
                self._recent[digest] = None
                self._recent.move_to_end(digest)
                while len(self._recent) > self.recent_limit:
                    self._recent.popitem(last=False)

    def _fetch_one(
        self, layout: FileLayout, index: int, path: str | None, page_in: bool = False
    ) -> Fetched:
        started = time.monotonic()
        fetched = Fetched(*self.repository.piece_fetch(layout, index), index)
        tracer = self.repository.tracer
        if tracer is not None and path is not None and fetched.how == "fetch":
            piece = layout.pieces[index]
            tracer.record(
                path,
                piece.offset,
                piece.size,
                time.monotonic() - started,
                source="prefetch",
                net_bytes=fetched.net_bytes,
                size=layout.size,
            )
        return fetched

    def read_ahead(self, layout: FileLayout, index: int, window: int, path: str | None) -> None:
        """Queue the ``window`` pieces after ``index`` (a sequential reader just entered it)."""
        if window > 0 and index + 1 < len(layout.pieces):
            self.fetch_pieces(layout, range(index + 1, index + 1 + window), path=path, page_in=True)

    def prefetch(self, paths: str | Sequence[str], *, wait_for: bool = True) -> WarmResult:
        """Fetch every piece of the files at ``paths`` (folders: every file below them)."""
        started = time.monotonic()
        futures: list[Future[Fetched]] = []
        layouts = [
            (entry.path, self.repository.layout(entry))
            for path in ([paths] if isinstance(paths, str) else paths)
            for entry in _regular_files(self.repository, path)
        ]
        files, total = len(layouts), sum(layout.size for _, layout in layouts)
        pieces = sum(len(layout.pieces) for _, layout in layouts)
        room = self.repository.cache.capacity_bytes()
        if total > room:  # its first pieces would be evicted for its last: all fetched for nothing
            raise ConfigError(
                f"warming {files} file(s) of {total / 2**20:.0f} MiB needs more than the cache "
                f"can hold ({room / 2**20:.0f} MiB: CVMFS_QUOTA_LIMIT, or what its disk holds); "
                "raise the quota, give the cache more disk, or warm less"
            )
        for path, layout in layouts:
            futures += self.fetch_pieces(layout, path=path)
        fetched = net = 0
        if wait_for:
            done, _ = wait(futures)
            for future in done:
                result = future.result()  # the first failure propagates
                if result.how == "fetch":
                    fetched += 1
                    net += result.net_bytes
        return WarmResult(files, total, pieces, fetched, net, time.monotonic() - started)


def _regular_files(repository: Repository, path: str) -> list[DirectoryEntry]:
    """Regular files at or below ``path``; links to files count once, dangling ones not at all."""
    entry = repository.resolve(path)
    if entry.is_regular:
        return [entry]
    if not entry.is_dir:
        return []
    found: dict[str, DirectoryEntry] = {}
    for item in repository.walk(entry.path):
        if item.is_symlink:  # e.g. model.onnx.data -> ../shared/weights.bin
            try:
                item = repository.resolve(item.path)
            except (CvmfsMlError, OSError):  # dangling, or leaves the repository
                continue
        if item.is_regular:
            found.setdefault(item.path, item)
    return list(found.values())


def warm(
    repository: Repository, paths: str | Sequence[str], *, parallel: int | None = None
) -> WarmResult:
    """Make every file below ``paths`` local, ``parallel`` pieces at a time.

    ``parallel=None`` uses the repository's shared pool (its ``prefetch_workers``); a number
    runs this call on its own pool of that many threads.
    """
    if parallel is None:
        return repository.prefetcher.prefetch(paths)
    with Prefetcher(repository, workers=parallel) as prefetcher:
        return prefetcher.prefetch(paths)
