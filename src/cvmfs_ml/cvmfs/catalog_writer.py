"""Editing a catalog file: :class:`WritableCatalog` (cvmfs-format.md §4, §8).

The publisher edits a copy of a catalog with it and finalises it (counters, properties) for
upload; :func:`totals` is what a child catalog adds to its parent's ``subtree_*`` counters.
Import the public names from :mod:`cvmfs_ml.cvmfs.catalog`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from cvmfs_ml.cvmfs.catalog_rows import (
    _COUNTER_NAMES,
    _ROW_COLUMNS,
    _SCHEMA_SQL,
    COUNTERS,
    NULL_HASH_HEX,
    SCHEMA,
    SCHEMA_REVISION,
    Chunk,
    DirectoryEntry,
    Flag,
    NestedRef,
    _entry_from_row,
    _normalise,
    decode_text,
    encode_text,
    encode_xattrs,
    parent_path,
)
from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, md5_pair
from cvmfs_ml.cvmfs.idle_connections import IdleConnections
from cvmfs_ml.errors import PublishError

__all__ = ["WritableCatalog", "totals"]


MAX_OPEN_WRITABLE = 64
"""Catalogs being written whose connection stays open (the rest commit to their temporary file
and close until used again; :mod:`~cvmfs_ml.cvmfs.idle_connections`)."""
_WRITING = IdleConnections(MAX_OPEN_WRITABLE)

_SYNCHRONOUS = "OFF"
"""A catalog being written is a private temporary file: a crash discards it with the
transaction, and what is published is made durable when it is stored (the store's flush before
the manifest names it). Syncing each commit of the temporary file bought nothing: creating a
nested catalog cost nine commits with an fsync each, and a publish of 3000 new nested catalogs
spent 17 of its 35 s there."""


class WritableCatalog:
    """A catalog file being edited by a publisher.

    Create one fresh with :meth:`create` or open a private copy of a published catalog with
    :meth:`open`. Edits go straight to SQLite (inside one transaction); :meth:`finalize` fills
    counters and properties and closes the file, which is then compressed and uploaded.
    """

    def __init__(self, path: Path, mountpoint: str) -> None:
        self.file = path
        self.mountpoint = _normalise(mountpoint)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = self._connect()
        self._finished = False
        self.dirty_dirs: set[str] = set()

    # -- the connection (closed while idle beyond MAX_OPEN_WRITABLE) ----------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)
        db.text_factory = decode_text
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")
        db.execute("BEGIN")
        return db

    def _disconnect(self) -> None:
        """Commit to the temporary file and close (the caller holds the lock): the file is this
        transaction's private copy, discarded by :meth:`abort` all the same."""
        if self._connection is not None:
            self._connection.execute("COMMIT")
            self._connection.close()
            self._connection = None

    @property
    def _db(self) -> sqlite3.Connection:
        with self._lock:
            if self._finished:
                raise PublishError(f"catalog {self.mountpoint or '/'} was already closed")
            if self._connection is None:
                self._connection = self._connect()
            # The catalog used last is never the one closed for another (a cursor of this
            # one may be live while a second catalog is used, as in move_below).
            _WRITING.touch(self)
            return self._connection

    def _finish(self) -> sqlite3.Connection:
        """The connection, for the last time: no longer counted among the open ones."""
        db = self._db
        with self._lock:
            self._finished = True
            self._connection = None
        _WRITING.forget(self)
        return db

    @classmethod
    def create(cls, path: Path, root: DirectoryEntry, *, nested: bool) -> WritableCatalog:
        """A new catalog holding only its root entry (flags 1 for the root, 33 if nested)."""
        if path.exists():
            path.unlink()
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")
        db.execute("BEGIN")  # one transaction: each CREATE TABLE on its own was a commit
        for statement in _SCHEMA_SQL:
            db.execute(statement)
        db.executemany(
            "INSERT INTO properties (key, value) VALUES (?, ?)",
            [("schema", SCHEMA), ("schema_revision", str(SCHEMA_REVISION))],
        )
        db.executemany(
            "INSERT INTO statistics (counter, value) VALUES (?, 0)", [(c,) for c in COUNTERS]
        )
        db.execute("COMMIT")
        db.close()
        catalog = cls(path, root.path)
        flags = Flag.DIR | (Flag.NESTED_ROOT if nested else 0)
        catalog.put(replace(root, flags=int(flags)))
        if nested:
            catalog.set_property("root_prefix", catalog.mountpoint)
        return catalog

    @classmethod
    def open(cls, path: Path, mountpoint: str) -> WritableCatalog:
        """Edit the catalog file at ``path`` (a private, decompressed copy)."""
        return cls(path, mountpoint)

    # -- rows ---------------------------------------------------------------------------------
    def put(self, entry: DirectoryEntry) -> None:
        """Insert or replace a row (the caller computes flags)."""
        path = _normalise(entry.path)
        key = md5_pair(path)
        parent = (0, 0) if path == "" else md5_pair(parent_path(path))
        self._db.execute(
            "INSERT OR REPLACE INTO catalog (md5path_1, md5path_2, parent_1, parent_2, "
            "hardlinks, hash, size, mode, mtime, mtimens, flags, name, symlink, uid, gid, xattr) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TEXT), CAST(? AS TEXT), ?, ?, ?)",
            (
                *key,
                *parent,
                entry.hardlinks,
                entry.digest.raw if entry.digest else None,
                entry.size,
                entry.mode,
                entry.mtime,
                entry.mtimens,
                entry.flags,
                encode_text(entry.name),
                encode_text(entry.symlink),
                entry.uid,
                entry.gid,
                encode_xattrs(entry.xattrs),
            ),
        )
        if path != self.mountpoint:
            self.dirty_dirs.add(parent_path(path))

    def lookup(self, path: str) -> DirectoryEntry | None:
        path = _normalise(path)
        row = self._db.execute(
            "SELECT " + _ROW_COLUMNS + " FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?",
            md5_pair(path),
        ).fetchone()
        return _entry_from_row(path, row) if row else None

    def children(self, path: str) -> list[DirectoryEntry]:
        path = _normalise(path)
        rows = self._db.execute(
            "SELECT " + _ROW_COLUMNS + " FROM catalog WHERE parent_1 = ? AND parent_2 = ?",
            md5_pair(path),
        ).fetchall()
        return [_entry_from_row(f"{path}/{row[11]}", row) for row in rows if row[11]]

    def has_children(self, path: str) -> bool:
        """Whether any row lies directly below ``path`` (without reading them)."""
        row = self._db.execute(
            "SELECT 1 FROM catalog WHERE parent_1 = ? AND parent_2 = ? LIMIT 1",
            md5_pair(_normalise(path)),
        ).fetchone()
        return row is not None

    def put_chunks(self, path: str, chunks: Iterable[Chunk]) -> None:
        key = md5_pair(_normalise(path))
        self._db.execute("DELETE FROM chunks WHERE md5path_1 = ? AND md5path_2 = ?", key)
        self._db.executemany(
            "INSERT INTO chunks (md5path_1, md5path_2, offset, size, hash) VALUES (?, ?, ?, ?, ?)",
            [(*key, c.offset, c.size, c.digest.raw) for c in chunks],
        )

    def chunk_list(self, path: str) -> list[Chunk]:
        rows = self._db.execute(
            "SELECT offset, size, hash FROM chunks WHERE md5path_1 = ? AND md5path_2 = ? "
            "ORDER BY offset",
            md5_pair(_normalise(path)),
        ).fetchall()
        entry = self.lookup(path)
        algorithm = entry.hash_algorithm if entry is not None else Algorithm.SHA1
        return [Chunk(offset, size, Digest(algorithm, bytes(blob))) for offset, size, blob in rows]

    def move_below(
        self, path: str, other: WritableCatalog, *, group_offset: int = 0
    ) -> list[NestedRef]:
        """Move every row below ``path`` (not ``path`` itself) to ``other``.

        Splits a directory off into a new nested catalog, or merges one into its parent
        (``group_offset`` then shifts hard-link group ids past the parent's own). Returns the
        nested catalogs that moved along (their ``nested_catalogs`` rows now live in ``other``).
        """
        path = _normalise(path)
        refs = [ref for ref in self.nested_refs() if ref.path.startswith(path + "/")]
        stack = [path]
        while stack:
            current = stack.pop()
            for entry in self.children(current):
                if entry.hardlink_group and group_offset:
                    entry = replace(entry, hardlinks=entry.hardlinks + (group_offset << 32))
                other.put(entry)
                if entry.is_chunked:
                    other.put_chunks(entry.path, self.chunk_list(entry.path))
                if entry.is_dir and not entry.is_nested_mountpoint:
                    stack.append(entry.path)
        for ref in refs:
            other.set_nested(ref)
        root = self.lookup(path)
        self.remove(path)
        if root is not None:
            self.put(root)
        return refs

    def remove(self, path: str) -> list[NestedRef]:
        """Remove ``path`` and everything below it in this catalog.

        Returns the nested catalogs that hung below the removed subtree (their rows in
        ``nested_catalogs`` are dropped too), so the caller can adjust subtree counters.
        """
        path = _normalise(path)
        removed_refs = [
            ref for ref in self.nested_refs() if ref.path == path or ref.path.startswith(path + "/")
        ]
        stack = [path]
        while stack:
            current = stack.pop()
            key = md5_pair(current)
            for (name,) in self._db.execute(
                "SELECT name FROM catalog WHERE parent_1 = ? AND parent_2 = ? AND (flags & 1)",
                key,
            ).fetchall():
                stack.append(f"{current}/{name}")
            self._db.execute(
                "DELETE FROM chunks WHERE md5path_1 IN (SELECT md5path_1 FROM catalog "
                "WHERE parent_1 = ? AND parent_2 = ?)",
                key,
            )
            self._db.execute("DELETE FROM catalog WHERE parent_1 = ? AND parent_2 = ?", key)
            self._db.execute("DELETE FROM chunks WHERE md5path_1 = ? AND md5path_2 = ?", key)
            self._db.execute("DELETE FROM catalog WHERE md5path_1 = ? AND md5path_2 = ?", key)
        for ref in removed_refs:
            self._db.execute(
                "DELETE FROM nested_catalogs WHERE path = CAST(? AS TEXT)", (encode_text(ref.path),)
            )
        self.dirty_dirs.add(parent_path(path))
        return removed_refs

    # -- nested catalogs ----------------------------------------------------------------------
    def drop_nested(self, path: str) -> None:
        """Forget the nested catalog reference at ``path`` (its rows were merged here)."""
        self._db.execute(
            "DELETE FROM nested_catalogs WHERE path = CAST(? AS TEXT)", (encode_text(path),)
        )

    def max_hardlink_group(self) -> int:
        """The highest hard-link group id in this catalog (0: none); new groups take the next."""
        (group,) = self._db.execute("SELECT MAX(hardlinks >> 32) FROM catalog").fetchone()
        return int(group or 0)

    def nested_refs(self) -> list[NestedRef]:
        rows = self._db.execute("SELECT path, sha1, size FROM nested_catalogs").fetchall()
        return [NestedRef(p, Digest.from_hex(h), int(s or 0)) for p, h, s in rows]

    def set_nested(self, ref: NestedRef) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO nested_catalogs (path, sha1, size) "
            "VALUES (CAST(? AS TEXT), ?, ?)",
            (encode_text(ref.path), ref.digest.hex, ref.size),
        )

    # -- properties and counters --------------------------------------------------------------
    def set_property(self, key: str, value: str | int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO properties (key, value) VALUES (?, ?)", (key, str(value))
        )

    def get_property(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM properties WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def statistics(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._db.execute("SELECT counter, value FROM statistics")}

    def fix_linkcounts(self) -> None:
        """Directories touched in this transaction get linkcount 2 + number of subdirectories."""
        for directory in sorted(self.dirty_dirs):
            entry = self.lookup(directory)
            # A mount point's subdirectories live in its nested catalog, which set the count.
            if entry is None or not entry.is_dir or entry.is_nested_mountpoint:
                continue
            (subdirs,) = self._db.execute(
                "SELECT count(*) FROM catalog WHERE parent_1 = ? AND parent_2 = ? AND (flags & 1)"
                " AND name != ''",
                md5_pair(directory),
            ).fetchone()
            hardlinks = (entry.hardlink_group << 32) | (2 + subdirs)
            if hardlinks != entry.hardlinks:
                self._db.execute(
                    "UPDATE catalog SET hardlinks = ? WHERE md5path_1 = ? AND md5path_2 = ?",
                    (hardlinks, *md5_pair(directory)),
                )

    def self_counters(self) -> dict[str, int]:
        """The ``self_*`` counters of this catalog, counted from its rows (§4.5)."""

        def one(sql: str, args: tuple = ()) -> int:
            return int(self._db.execute(sql, args).fetchone()[0] or 0)

        regular = "(flags & 4) AND NOT (flags & 8) AND NOT (flags & 16)"
        return {
            "self_regular": one(f"SELECT count(*) FROM catalog WHERE {regular}"),
            "self_file_size": one(f"SELECT sum(size) FROM catalog WHERE {regular}"),
            "self_symlink": one("SELECT count(*) FROM catalog WHERE (flags & 8)"),
            "self_special": one("SELECT count(*) FROM catalog WHERE (flags & 16)"),
            "self_dir": one("SELECT count(*) FROM catalog WHERE (flags & 1)"),
            "self_nested": one("SELECT count(*) FROM catalog WHERE (flags & 2)"),
            "self_chunked": one("SELECT count(*) FROM catalog WHERE (flags & 64)"),
            "self_chunked_size": one("SELECT sum(size) FROM catalog WHERE (flags & 64)"),
            "self_chunks": one("SELECT count(*) FROM chunks"),
            "self_xattr": one("SELECT count(*) FROM catalog WHERE xattr IS NOT NULL"),
            "self_external": one("SELECT count(*) FROM catalog WHERE (flags & 128)"),
            "self_external_file_size": one("SELECT sum(size) FROM catalog WHERE (flags & 128)"),
        }

    def finalize(
        self,
        *,
        revision: int,
        last_modified: int,
        previous_revision: Digest | None,
        subtree: Mapping[str, int],
        ttl: int | None = None,
    ) -> dict[str, int]:
        """Write counters and properties, commit and close. Returns the full counter set.

        ``subtree`` holds the ``subtree_*`` values (sums over the direct child catalogs of their
        ``self_*`` plus ``subtree_*``), which only the publisher can know.
        """
        self.fix_linkcounts()
        counters = dict(self.self_counters())
        for name in _COUNTER_NAMES:
            counters[f"subtree_{name}"] = int(subtree.get(f"subtree_{name}", 0))
        self._db.executemany(
            "INSERT OR REPLACE INTO statistics (counter, value) VALUES (?, ?)",
            sorted(counters.items()),
        )
        if ttl is not None:
            self.set_property("TTL", ttl)
        self.set_property("last_modified", last_modified)
        self.set_property("revision", revision)
        if previous_revision is not None:
            self.set_property("previous_revision", previous_revision.hex)
        elif self.mountpoint:
            self.set_property("previous_revision", NULL_HASH_HEX)
        db = self._finish()
        db.execute("COMMIT")
        db.execute("VACUUM")
        db.close()
        return counters

    def abort(self) -> None:
        with self._lock:
            db, self._connection, self._finished = self._connection, None, True
        _WRITING.forget(self)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()


def totals(counters: Mapping[str, int]) -> dict[str, int]:
    """What a child catalog contributes to its parent's ``subtree_*``: self + subtree."""
    return {
        f"subtree_{name}": int(counters.get(f"self_{name}", 0))
        + int(counters.get(f"subtree_{name}", 0))
        for name in _COUNTER_NAMES
    }
