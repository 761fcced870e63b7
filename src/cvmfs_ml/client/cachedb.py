"""The client cache's database (``<root>/cachedb``): its schema and the SQL that every
:class:`~cvmfs_ml.client.cache.ObjectCache` write runs inside one ``BEGIN IMMEDIATE``
transaction: sizes, LRU order and pins by process."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path

from cvmfs_ml.storage import sqlitefile

__all__ = [
    "DDL",
    "SCHEMA",
    "add_size",
    "drop_dead_pins",
    "empty",
    "next_seq",
    "pid_alive",
    "pin",
    "recount",
    "remove_entries",
    "set_aside_if_damaged",
    "take_victims",
    "total",
]

SCHEMA = "cvmfs-ml/1"

DDL = """
CREATE TABLE IF NOT EXISTS cache_catalog (
    sha1 TEXT PRIMARY KEY,        -- digest hex incl. algorithm id (upstream's column name)
    size INTEGER NOT NULL,        -- bytes of the decompressed file
    acseq INTEGER NOT NULL,       -- LRU sequence, larger is more recent
    type INTEGER NOT NULL DEFAULT 0,  -- 1 when stored pinned (catalogs), else 0
    checksum INTEGER NOT NULL,    -- CRC-32 of the file
    stamp TEXT                    -- "inode:ctime_ns" right after the commit (see get_path)
);
CREATE INDEX IF NOT EXISTS cache_catalog_acseq ON cache_catalog (acseq);
CREATE TABLE IF NOT EXISTS pins (
    sha1 TEXT NOT NULL,
    pid INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (sha1, pid)
);
CREATE TABLE IF NOT EXISTS properties (key TEXT PRIMARY KEY, value);
"""


def total(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM properties WHERE key = 'size'").fetchone()[0])


def add_size(db: sqlite3.Connection, delta: int) -> None:
    if delta:
        db.execute("UPDATE properties SET value = value + ? WHERE key = 'size'", (delta,))


def recount(db: sqlite3.Connection) -> None:
    """Set the running total to the sum of the rows (after rows were dropped by hand)."""
    value = db.execute("SELECT COALESCE(SUM(size), 0) FROM cache_catalog").fetchone()[0]
    db.execute("UPDATE properties SET value = ? WHERE key = 'size'", (value,))


def empty(db: sqlite3.Connection) -> None:
    """Forget every entry and pin; the total is zero."""
    db.execute("DELETE FROM cache_catalog")
    db.execute("DELETE FROM pins")
    db.execute("UPDATE properties SET value = 0 WHERE key = 'size'")


def take_victims(db: sqlite3.Connection, target: int, keep: str | None) -> list[str]:
    """Drop the least recently used unpinned rows (never ``keep``) until at most ``target``
    bytes remain, or none are left to drop; return their digests (the caller removes the
    files, inside the same transaction)."""
    total_now = total(db)
    if total_now <= target:
        return []
    drop_dead_pins(db)
    victims: list[str] = []
    freed = 0
    rows = db.execute(
        "SELECT sha1, size FROM cache_catalog "
        "WHERE sha1 NOT IN (SELECT sha1 FROM pins) ORDER BY acseq ASC"
    )
    for text, size in rows:
        if total_now - freed <= target:
            break
        if text != keep:
            victims.append(text)
            freed += size
    db.executemany("DELETE FROM cache_catalog WHERE sha1 = ?", [(t,) for t in victims])
    add_size(db, -freed)
    return victims


def next_seq(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COALESCE(MAX(acseq), 0) + 1 FROM cache_catalog").fetchone()[0])


def pin(db: sqlite3.Connection, text: str, pid: int) -> None:
    db.execute(
        "INSERT INTO pins (sha1, pid, count) VALUES (?, ?, 1) "
        "ON CONFLICT (sha1, pid) DO UPDATE SET count = count + 1",
        (text, pid),
    )


def drop_dead_pins(db: sqlite3.Connection) -> None:
    pids = [int(row[0]) for row in db.execute("SELECT DISTINCT pid FROM pins")]
    dead = [(pid,) for pid in pids if not pid_alive(pid)]
    if dead:
        db.executemany("DELETE FROM pins WHERE pid = ?", dead)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (pins and txn files of dead ones are ignored)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def set_aside_if_damaged(root: Path) -> Path | None:
    """Move a damaged ``<root>/cachedb`` aside and empty the cache; where it went, or None.

    Why: a cachedb that no longer opens (a disk error, a crash on a file system that lost
    its writes, someone else's file) stopped every mount and reader of the cache until an
    administrator removed it. Upstream's client rebuilds its cache database in that case; here
    the entries go with it, because without their checksums a file cannot be trusted (they
    are fetched again). Under an exclusive lock, and checked again inside it, so that of
    several processes starting at once only one moves it, never the new database.
    """
    with open(root / "cachedb.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not sqlitefile.is_damaged(root / "cachedb"):
            return None
        # While the damaged file is in place no process can use the cache, so the entries go
        # first and the file last (set_aside: its journal before it).
        remove_entries(root)
        aside = sqlitefile.set_aside(root / "cachedb")
    return aside


def remove_entries(root: Path) -> None:
    """Remove every object file of the cache at ``root`` (its 256 folders stay)."""
    for i in range(256):
        with contextlib.suppress(FileNotFoundError), os.scandir(root / f"{i:02x}") as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
