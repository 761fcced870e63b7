"""Remember what published files became, so unchanged files are not read again.

Re-publishing a model folder that did not change must cost almost nothing; without this, every
byte is read, chunked and hashed again (and recompressed, since object names hash the stored
bytes). The key is what changes whenever a file's content may have: device, inode, size,
``mtime_ns`` and ``ctime_ns`` (which no user can set back), plus a fingerprint of the settings
that shape objects (compression, chunk sizes, hash algorithm). A hit is used only if every
object it names is still in the store (garbage collection may have removed some).

The cache is a SQLite file beside the keys; only publishers (under the repository lock) use it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cvmfs_ml.cvmfs.catalog import Chunk
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.storage import sqlitefile
from cvmfs_ml.storage.base import ObjectStore

if TYPE_CHECKING:
    from cvmfs_ml.publish.ingest import FileContent
    from cvmfs_ml.publish.settings import PublishSettings

__all__ = ["FileCache", "FileKey", "remember_laid_out", "settings_fingerprint"]

log = logging.getLogger(__name__)


class FileKey(NamedTuple):
    """What identifies one version of a local file."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileKey:
        """The key of the file ``st`` describes (device, inode, size and times)."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settings_fingerprint(settings: PublishSettings) -> str:
    """The settings that decide object names; a change of any of them misses the cache."""
    return json.dumps(
        [
            settings.compression.value,
            settings.hash_algorithm.config_name,
            settings.use_chunking,
            settings.min_chunk_size,
            settings.avg_chunk_size,
            settings.max_chunk_size,
            settings.auto_min_saving,
        ]
    )


class FileCache:
    """What each local file published before became, by :class:`FileKey` and settings.

    A file that no longer opens as a database (a disk error, a crash on a file system that
    lost its writes) is moved aside and the cache starts empty: it only saves reading
    unchanged files again, so a damaged one must not stop every publish.
    """

    save_every = 1024
    """Rows remembered are written in one transaction per this many (and at :meth:`close`):
    one commit per row cost a publish of 50,000 small files 4 of its 14 s."""

    def __init__(self, path: Path, settings: PublishSettings) -> None:
        self.path = Path(path)
        self.fingerprint = settings_fingerprint(settings)
        self._lock = threading.Lock()
        self._unsaved: list[tuple[object, ...]] = []
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if not sqlitefile.is_damage(exc):
                raise
            self._db = self._start_again(exc)

    def _execute(self, sql: str, params: tuple[object, ...]) -> tuple[object, ...] | None:
        """One statement under the lock; its first row. Damage found now (a page that no
        longer reads) starts the cache again, and the statement counts as a miss."""
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchone()  # type: ignore[no-any-return]
            except sqlite3.DatabaseError as exc:
                self._start_again_if_damaged(exc)
                return None

    def _start_again_if_damaged(self, exc: sqlite3.DatabaseError) -> None:
        """Re-raise ``exc`` unless it says the file is damaged; then start with an empty one."""
        if not sqlitefile.is_damage(exc):
            raise exc
        self._db.close()
        self._db = self._start_again(exc)

    def _start_again(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        aside = sqlitefile.set_aside(self.path)
        log.warning("the publisher's file cache %s was damaged (%s): moved to %s; unchanged "
                    "files are read once more", self.path, exc, aside.name)  # fmt: skip
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A cache: a row lost with the last moments before a power cut is one file read
            # again. In WAL mode NORMAL still never corrupts the file, and it does not sync
            # every row's commit: a publish of 50,000 small files spent 8 of its 25 s there.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (device INTEGER, inode INTEGER, size INTEGER, "
                "mtime_ns INTEGER, ctime_ns INTEGER, settings TEXT, content TEXT, "
                "PRIMARY KEY (device, inode, size, mtime_ns, ctime_ns, settings))"
            )
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        try:
            self.save()
        finally:
            with self._lock:
                self._db.close()

    def save(self) -> None:
        """Write the rows remembered since the last save (lost in a crash before: those files
        are read once more at the next publish)."""
        rows, self._unsaved = self._unsaved, []
        if not rows:
            return
        with self._lock:
            try:
                with self._db:  # one transaction: committed, or rolled back on an error
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows
                    )
            except sqlite3.DatabaseError as exc:
                self._start_again_if_damaged(exc)

    def lookup(self, key: FileKey, store: ObjectStore) -> FileContent | None:
        from cvmfs_ml.publish.ingest import FileContent

        row = self._execute(
            "SELECT content FROM files WHERE device = ? AND inode = ? AND size = ? AND "
            "mtime_ns = ? AND ctime_ns = ? AND settings = ?",
            (*key, self.fingerprint),
        )
        if row is None:
            return None
        try:
            data = json.loads(row[0])  # type: ignore[arg-type]
            if data["digest"] is not None:
                content = FileContent(
                    data["size"], data["compressed"], Digest.from_hex(data["digest"])
                )
                needed = [object_path(content.digest, ObjectKind.FILE)]  # type: ignore[arg-type]
            else:
                chunks = tuple(Chunk(o, s, Digest.from_hex(h)) for o, s, h in data["chunks"])
                content = FileContent(data["size"], data["compressed"], None, chunks)
                needed = list({object_path(c.digest, ObjectKind.PARTIAL) for c in chunks})
        except (ValueError, KeyError, TypeError):
            return None  # an entry we cannot read is just a miss
        if content.size != key.size or not all(store.exists(rel) for rel in needed):
            return None
        return content

    def remember(self, key: FileKey, content: FileContent) -> None:
        data = {
            "size": content.size,
            "compressed": content.compressed,
            "digest": content.digest.hex if content.digest else None,
            "chunks": [[c.offset, c.size, c.digest.hex] for c in content.chunks],
        }
        self._unsaved.append((*key, self.fingerprint, json.dumps(data)))
        if len(self._unsaved) >= self.save_every:
            self.save()


def remember_laid_out(
    cache_path: Path, settings: PublishSettings, files: Iterable[tuple[Path, FileContent]]
) -> int:
    """Record that each file at ``path`` holds ``content``, whose objects are already stored
    (made while its bytes arrived, before the file was laid out): the next publish of the
    file takes them instead of reading it. Call once the file is in its final place; its key
    is taken now. A path that is not a regular file of the content's size is skipped.
    Returns how many were recorded."""
    recorded = 0
    cache: FileCache | None = None
    try:
        for path, content in files:
            st = os.stat(path, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size != content.size:
                continue
            if cache is None:
                cache = FileCache(cache_path, settings)
            cache.remember(FileKey.of(st), content)
            recorded += 1
    finally:
        if cache is not None:
            cache.close()
    return recorded
