"""SQLite files that may be found damaged: telling damage from a busy database, and moving a
damaged one aside with its journal.

Our SQLite files that are caches (the client's ``cachedb``, the publisher's ``files.db``) are
rebuilt when they no longer open, as upstream rebuilds its cache database: a disk error or a
crash on a file system that lost its writes must not stop every later mount or publish. Files
that hold state nothing else has (the registry's queue and OCI index) are left for their
operator instead, with one line that names them (:func:`damage_refused`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from cvmfs_ml.errors import DamagedDatabaseError

__all__ = ["damage_refused", "is_damage", "is_damaged", "set_aside"]


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged ("file is not a database", "database
    disk image is malformed"), not busy, locked, unreadable or out of space (those are
    ``OperationalError``, which nothing rebuilt would cure)."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)


def is_damaged(path: Path) -> bool:
    """Whether ``path`` exists and does not open as a SQLite database (its schema is read)."""
    try:
        db = sqlite3.connect(path, timeout=60)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return is_damage(exc)
    return False


def set_aside(path: Path) -> Path:
    """Move ``path`` and its journal to ``<name>.damaged.<ns>`` (kept for a post-mortem);
    the new name. The journal goes first and the file last: a process that creates the new
    database once the file is gone must not have its new journal moved away."""
    aside = path.with_name(f"{path.name}.damaged.{time.time_ns()}")
    for suffix in ("-wal", "-shm", "-journal", ""):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


@contextlib.contextmanager
def damage_refused(path: Path, lost: str) -> Iterator[None]:
    """Damage found in ``path`` inside the block becomes a :class:`DamagedDatabaseError` that
    names the file and what moving it aside loses (``lost``)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        raise DamagedDatabaseError(
            f"{path} is damaged ({exc}): restore it from a backup, or move it aside to start "
            f"with an empty one ({lost})"
        ) from exc
