"""The client cache's space: quota eviction, a disk that fills up before the quota, and usage.

:class:`CacheSpace` is the part of :class:`~cvmfs_ml.client.cache.ObjectCache` that decides
what leaves the cache and reports what it holds; lookups, puts and their checks stay in
:mod:`.cache`. Eviction removes rows and files under the cachedb write lock (see there).

Two limits apply. The quota (``CVMFS_QUOTA_LIMIT``): a put that takes the total over it evicts
least-recently used unpinned entries down to half of it, as upstream does. And the disk, which
is often smaller than the 4000 MB default or filled by other files: a put that meets ENOSPC
calls :meth:`CacheSpace.make_room` and is tried again, and readers size their read-ahead by
:meth:`CacheSpace.capacity_bytes`, the smaller of the two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_ml.client import cachedb
from cvmfs_ml.errors import CacheFullError, is_disk_full

__all__ = ["CacheSpace", "CacheUsage"]

log = logging.getLogger("cvmfs_ml.client.cache")

_ROOM_MARGIN = 1 << 20  # kept free by make_room, at least, for the cachedb and its journal


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """What :meth:`CacheSpace.usage` reports."""

    size_bytes: int
    entries: int
    pinned_bytes: int
    quota_bytes: int | None
    quarantined: int


class CacheSpace:
    """Eviction, room on the disk and usage, over the cachedb of an ``ObjectCache``."""

    root: Path
    quota_bytes: int | None
    quarantine_dir: Path
    _verified: dict[str, tuple[int, int, int]]

    if TYPE_CHECKING:  # provided by ObjectCache (its CacheConnection)

        def _locked(self) -> threading.RLock: ...
        def _connect(self) -> sqlite3.Connection: ...
        def _flush_touches(self, db: sqlite3.Connection) -> None: ...
        @contextlib.contextmanager
        def _write(self) -> Iterator[sqlite3.Connection]: ...

    def evict_to(self, target_bytes: int) -> int:
        """Evict least-recently used unpinned entries until at most ``target_bytes`` remain.

        Returns the bytes freed (less than needed when pins hold the rest).
        """
        with self._write() as db:
            self._flush_touches(db)
            return self._evict(db, target_bytes)

    def capacity_bytes(self) -> int:
        """What the cache can hold now: the quota, or less where the disk holds less (the
        entries plus the free space)."""
        with self._locked():
            cached = cachedb.total(self._connect())
        fs = os.statvfs(self.root)
        disk = cached + fs.f_bavail * fs.f_frsize
        return disk if self.quota_bytes is None or disk < self.quota_bytes else self.quota_bytes

    def make_room(self, needed: int) -> int:
        """Evict after the disk filled up before the quota did, so ``needed`` bytes fit again.

        Why: the quota (``CVMFS_QUOTA_LIMIT``, 4000 MB by default) is often more than the
        cache's disk holds, or other files fill that disk; without this every object not yet
        cached failed with ENOSPC for as long as the process lived. Evicts least-recently used
        unpinned entries down to half of what the disk can hold for the cache (its entries
        plus the free space, less a margin), as the quota would, and to less where ``needed``
        requires it. Returns the bytes freed; raises :class:`CacheFullError` when even that
        leaves no room (other files or pinned entries fill the disk).
        """
        try:
            with self._write() as db:
                self._flush_touches(db)
                cached = cachedb.total(db)
                fs = os.statvfs(self.root)
                free = fs.f_bavail * fs.f_frsize
                holds = cached + free - max(_ROOM_MARGIN, (cached + free) // 32)
                freed = self._evict(db, max(0, min(holds // 2, holds - needed)))
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            # The evicted files were still open (their blocks stay until closed), so not even
            # the database's journal had room: the same answer as any disk too full to cache.
            raise CacheFullError(
                f"the cache disk {self.root} is too full even to record an eviction: free "
                "space on it, or move CVMFS_CACHE_BASE"
            ) from exc
        if free + freed < needed:  # other files, pins, or files being written fill it
            raise CacheFullError(
                f"the cache disk {self.root} has no room for {needed} more bytes (at most "
                f"{free + freed} after evicting): free space on it, or move CVMFS_CACHE_BASE"
            )
        log.warning(
            "cache %s: the disk filled up at %d MB cached (quota %s): evicted %d MB; set "
            "CVMFS_QUOTA_LIMIT below what the disk holds", self.root, cached >> 20,
            "unlimited" if self.quota_bytes is None else f"{self.quota_bytes >> 20} MB",
            freed >> 20,
        )  # fmt: skip
        return freed

    def _evict(self, db: sqlite3.Connection, target: int, keep: str | None = None) -> int:
        before = cachedb.total(db)
        for text in cachedb.take_victims(db, target, keep):
            self._verified.pop(text, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / text[:2] / text[2:])
        return before - cachedb.total(db)

    def usage(self) -> CacheUsage:
        """Current size, entry count, bytes pinned by live processes, quota, quarantined files."""
        with self._locked():
            db = self._connect()
            total = cachedb.total(db)
            entries = db.execute("SELECT COUNT(*) FROM cache_catalog").fetchone()[0]
            pinned = db.execute(
                "SELECT c.sha1, c.size, p.pid FROM cache_catalog c JOIN pins p USING (sha1)"
            ).fetchall()
        live: dict[str, int] = {}
        for text, size, pid in pinned:
            if cachedb.pid_alive(pid):
                live[text] = size
        quarantined = sum(1 for _ in os.scandir(self.quarantine_dir))
        return CacheUsage(total, int(entries), sum(live.values()), self.quota_bytes, quarantined)
