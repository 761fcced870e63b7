"""The object cache's cachedb connection in one process, and its batched LRU updates.

:class:`CacheConnection` is the part of :class:`~cvmfs_ml.client.cache.ObjectCache` that holds
the process's SQLite connection: a lock and a connection of its own after a fork, the schema
made on first use, write transactions (``BEGIN IMMEDIATE``, the lock across processes under
which rows and files change together, see :mod:`.cache`) and the LRU order, updated in
batches so lookups stay cheap. Lookups, puts and their checks stay in :mod:`.cache`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cvmfs_ml.client import cachedb
from cvmfs_ml.errors import ConfigError, is_disk_full

__all__ = ["CacheConnection"]

_BUSY_TIMEOUT_MS = 60_000


class CacheConnection:
    """The cachedb connection, lock and pending LRU updates of an ``ObjectCache``."""

    root: Path
    _lock: threading.RLock
    _pid: int
    _db: sqlite3.Connection | None
    _inherited: list[sqlite3.Connection]
    _touches: dict[str, None]
    _last_flush: float

    def _locked(self) -> threading.RLock:
        """This process's lock; after a fork, a fresh lock and connection (never the parent's).

        The parent's connection object is kept, not closed: closing a SQLite connection in a
        forked child can disturb the parent's file locks.
        """
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.RLock()
            self._touches = {}
            if self._db is not None:
                self._inherited.append(self._db)
                self._db = None
        return self._lock

    def _connect(self) -> sqlite3.Connection:
        """The process's cachedb connection (call with :meth:`_locked` held)."""
        if self._db is not None:
            return self._db
        db = sqlite3.connect(
            self.root / "cachedb",
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        for _ in range(100):
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:  # another process is switching it right now
                time.sleep(0.05)
        db.execute("PRAGMA synchronous = NORMAL")
        self._check_foreign(db)
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in cachedb.DDL.split(";"):
                if statement.strip():
                    db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(cache_catalog)")}
            if "stamp" not in columns:
                db.execute("ALTER TABLE cache_catalog ADD COLUMN stamp TEXT")
            db.execute("INSERT OR IGNORE INTO properties VALUES ('schema', ?)", (cachedb.SCHEMA,))
            db.execute("INSERT OR IGNORE INTO properties VALUES ('size', 0)")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._db = db
        return db

    def _check_foreign(self, db: sqlite3.Connection) -> None:
        """Refuse to share a folder with upstream's cvmfs2 cache manager."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(cache_catalog)")}
        if columns and "checksum" not in columns:
            db.close()
            raise ConfigError(
                f"CVMFS_CACHE_BASE: {self.root} holds upstream cvmfs2's cache; "
                "give cvmfs-ml a folder of its own"
            )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the cachedb lock across processes."""
        with self._locked():
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._locked():
            return self._connect().execute(sql, args).fetchall()

    def _touch(self, text: str) -> None:
        """Note a use for the LRU order; written in batches to keep lookups cheap."""
        with self._locked():
            self._touches.pop(text, None)
            self._touches[text] = None
            if len(self._touches) < 64 and time.monotonic() - self._last_flush < 1.0:
                return
            self._write_touches()

    def _write_touches(self) -> None:
        """Write the pending LRU updates, unless the disk is full: the order is advice, and
        a read of what is cached must not fail for it (the next fetch makes room)."""
        if not self._touches:
            return
        try:
            with self._write() as db:
                self._flush_touches(db)
        except sqlite3.OperationalError as exc:
            if not is_disk_full(exc):
                raise
            self._last_flush = time.monotonic()

    def _flush_touches(self, db: sqlite3.Connection) -> None:
        if self._touches:
            seq = cachedb.next_seq(db)
            db.executemany(
                "UPDATE cache_catalog SET acseq = ? WHERE sha1 = ?",
                [(seq + i, text) for i, text in enumerate(self._touches)],
            )
            self._touches.clear()
        self._last_flush = time.monotonic()
