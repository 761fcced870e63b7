"""The SQLite file catalog, schema 2.5 revision 7 (cvmfs-format.md §4, §8).

:class:`Catalog` reads a decompressed catalog file; :class:`WritableCatalog` edits one (a copy
made by the publisher) and finalises it (counters, properties) for upload. Rows are keyed by the
split MD5 of the *full* repository path, so nested catalogs use the same keys as the root.

This module is the reader and the one place to import catalog names from. The schema, flags and
entries live in :mod:`~cvmfs_ml.cvmfs.catalog_rows`, the writer in
:mod:`~cvmfs_ml.cvmfs.catalog_writer`; both are re-exported here.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cvmfs_ml.cvmfs.catalog_rows import (
    _COMPRESSION_MASK,
    _HASH_ALGO_MASK,
    _HASH_ALGO_SHIFT,
    COUNTERS,
    DEFAULT_TTL,
    NULL_HASH_HEX,
    SCHEMA,
    SCHEMA_REVISION,
    Chunk,
    DirectoryEntry,
    Flag,
    NestedRef,
    _child_path,
    _entry_from_row,
    _normalise,
    decode_text,
    decode_xattrs,
    encode_text,
    encode_xattrs,
    parent_path,
)
from cvmfs_ml.cvmfs.catalog_writer import WritableCatalog, totals
from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, md5_pair
from cvmfs_ml.cvmfs.idle_connections import IdleConnections
from cvmfs_ml.errors import SQLITE_DAMAGE, FormatError

__all__ = [
    "COUNTERS",
    "DEFAULT_TTL",
    "SCHEMA",
    "SCHEMA_REVISION",
    "Catalog",
    "Chunk",
    "DirectoryEntry",
    "Flag",
    "MARKER",
    "NULL_HASH_HEX",
    "NestedRef",
    "WritableCatalog",
    "decode_text",
    "decode_xattrs",
    "encode_text",
    "encode_xattrs",
    "parent_path",
    "referenced_objects",
    "sized_objects",
    "totals",
    "walk_catalog_tree",
]

MARKER = ".cvmfscatalog"
"""A file of this name makes its directory the root of a nested catalog (``cvmfs_server``'s
convention; also what ``.cvmfsdirtab`` rules put in the directories they select)."""

MAX_OPEN_CATALOGS = 128
"""Read-only catalogs whose connection stays open (:mod:`~cvmfs_ml.cvmfs.idle_connections`)."""

_OPEN = IdleConnections(MAX_OPEN_CATALOGS)


class Catalog:
    """A catalog file opened read-only.

    Safe to share between threads (one connection guarded by a lock: queries are short).
    ``mountpoint`` is the repository path of the catalog's root (``""`` for the root catalog).
    A file-backed catalog's connection may be closed while idle (:data:`MAX_OPEN_CATALOGS`)
    and is opened again on the next query: the file must stay in place until :meth:`close`.
    """

    def __init__(
        self,
        path: Path | str,
        mountpoint: str | None = None,
        *,
        what: str = "",
        raw: bytes | None = None,
    ) -> None:
        self.file = Path(path)
        self.what = what or f"catalog {self.file.name}"
        self._nested: list[NestedRef] | None = None
        self._lock = threading.Lock()
        self._in_memory = raw is not None
        self._closed = False
        self._db: sqlite3.Connection | None = None
        try:
            if raw is None:
                self._db = self._connect()
            else:  # held in memory: nothing touches the disk (gc on a full disk)
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
                self._db.deserialize(raw)
                self._db.text_factory = decode_text
            self._properties = dict(self._db.execute("SELECT key, value FROM properties"))
            self._columns = {row[1] for row in self._db.execute("PRAGMA table_info(catalog)")}
        except SQLITE_DAMAGE as exc:
            if self._db is not None:
                self._db.close()
            raise FormatError(self.what, f"not a readable catalog: {exc}") from exc
        if not self._in_memory:
            _OPEN.touch(self)
        if "md5path_1" not in self._columns:
            raise FormatError(self.what, "no catalog table")
        prefix = self._properties.get("root_prefix")
        claimed = _normalise(prefix) if isinstance(prefix, str) else None
        self.mountpoint = _normalise(mountpoint if mountpoint is not None else claimed or "")
        # Where the parent mounts it (``mountpoint``) and where it says it belongs must agree:
        # a catalog listed under /b that was made for /a showed /a's tree under /b. Root
        # catalogs carry no root_prefix (upstream writes it for nested ones only).
        if claimed is not None and claimed != self.mountpoint:
            raise FormatError(
                self.what, f"root_prefix {prefix!r} != mount point {self.mountpoint or '/'!r}"
            )
        has_mtimens = "mtimens" in self._columns and self.schema_revision >= 7
        has_xattr = "xattr" in self._columns
        self._select = (
            "SELECT hardlinks, hash, size, mode, mtime, "
            + ("mtimens" if has_mtimens else "NULL")
            + ", flags, symlink, uid, gid, "
            + ("xattr" if has_xattr else "NULL")
            + ", name FROM catalog"
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def properties(self) -> dict[str, str]:
        return dict(self._properties)

    def _int_property(self, key: str, default: int = 0) -> int:
        value = self._properties.get(key, default)
        try:  # '1e999' and 'inf' are floats no int holds; NULL is no number at all
            return int(float(value))
        except (ValueError, OverflowError, TypeError) as exc:
            raise FormatError(self.what, f"property {key} {value!r:.60} is not a number") from exc

    @property
    def schema_revision(self) -> int:
        return self._int_property("schema_revision", 0)

    @property
    def revision(self) -> int:
        return self._int_property("revision")

    @property
    def last_modified(self) -> int:
        return self._int_property("last_modified")

    @property
    def ttl(self) -> int:
        return self._int_property("TTL", DEFAULT_TTL)

    @property
    def previous_revision(self) -> Digest | None:
        text = self._properties.get("previous_revision")
        if not text or set(text) <= {"0"}:
            return None
        try:
            return Digest.from_hex(text)
        except FormatError as exc:
            raise FormatError(
                self.what, f"property previous_revision {text!r:.60} is not a hash"
            ) from exc

    # -- the connection -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{self.file}?mode=ro&immutable=1"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        # Upstream stores names and link targets as raw bytes in TEXT columns: bytes that
        # are not UTF-8 come back as surrogates, and encode back to the same bytes.
        db.text_factory = decode_text
        return db

    def _disconnect(self) -> None:
        """Close the connection while idle (the caller holds the lock); reopened on demand."""
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- queries ------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._closed:
                raise FormatError(self.what, "catalog already closed")
            try:
                if self._db is None:
                    self._db = self._connect()
                if not self._in_memory:
                    _OPEN.touch(self)
                return self._db.execute(sql, args).fetchall()
            except SQLITE_DAMAGE as exc:
                raise FormatError(self.what, f"corrupt catalog: {exc}") from exc

    def lookup(self, path: str) -> DirectoryEntry | None:
        """The row for ``path`` in this catalog, or ``None``."""
        path = _normalise(path)
        rows = self._query(self._select + " WHERE md5path_1 = ? AND md5path_2 = ?", md5_pair(path))
        return _entry_from_row(path, rows[0], self.what) if rows else None

    def listing(self, path: str) -> list[DirectoryEntry]:
        """The rows whose parent is ``path``, sorted by name."""
        path = _normalise(path)
        rows = self._query(self._select + " WHERE parent_1 = ? AND parent_2 = ?", md5_pair(path))
        if not path:  # the root row, should a writer make it its own child, is not listed
            rows = [row for row in rows if row[11] != ""]
        entries = [_entry_from_row(_child_path(path, row[11], self.what), row, self.what)
                   for row in rows]  # fmt: skip
        entries.sort(key=lambda e: e.name)
        for before, after in itertools.pairwise(entries):  # rows whose md5path is not their path's
            if before.name == after.name:  # a walk would list a duplicated folder once per copy
                raise FormatError(
                    self.what, f"two entries named {after.name!r} under {path or '/'!r}"
                )
        return entries

    def chunks(self, entry: DirectoryEntry | str) -> list[Chunk]:
        """Chunks of a chunked file, in offset order, checked to tile the file."""
        if isinstance(entry, str):
            found = self.lookup(entry)
            if found is None:
                raise FormatError(self.what, f"no entry {entry!r}")
            entry = found
        rows = self._query(
            "SELECT offset, size, hash FROM chunks WHERE md5path_1 = ? AND md5path_2 = ? "
            "ORDER BY offset",
            md5_pair(entry.path),
        )
        algorithm = entry.hash_algorithm
        chunks, expected = [], 0
        for offset, size, blob in rows:
            if (
                type(offset) is not int
                or type(size) is not int
                or not isinstance(blob, bytes)
                or offset != expected
                or size <= 0
            ):
                raise FormatError(self.what, f"chunks of {entry.path!r} do not tile the file")
            try:
                chunks.append(Chunk(offset, size, Digest(algorithm, blob)))
            except FormatError as exc:
                raise FormatError(self.what, f"chunk of {entry.path!r}: {exc}") from None
            expected = offset + size
        if expected != entry.size:
            raise FormatError(
                self.what, f"chunks of {entry.path!r} cover {expected} of {entry.size} bytes"
            )
        return chunks

    def nested_catalogs(self) -> list[NestedRef]:
        """The direct child catalogs, checked (read once: the file never changes, and every
        lookup below this catalog asks; a query per level made a deep chain quadratic)."""
        return list(self._nested_refs())

    def _nested_refs(self) -> list[NestedRef]:
        if self._nested is None:
            self._nested = self._read_nested()
        return self._nested

    def _read_nested(self) -> list[NestedRef]:
        rows = self._query("SELECT path, sha1, size FROM nested_catalogs ORDER BY path")
        refs: list[NestedRef] = []
        seen: set[str] = set()
        for path, text, size in rows:
            if not isinstance(path, str) or not isinstance(text, str):
                raise FormatError(self.what, f"nested catalog row {path!r} has wrong types")
            if size is not None and (type(size) is not int or size < 0):
                raise FormatError(self.what, f"nested catalog {path!r}: bad size {size!r}")
            try:
                refs.append(NestedRef(_normalise(path), Digest.from_hex(text), size or 0))
            except FormatError as exc:
                raise FormatError(self.what, f"nested catalog {path!r}: {exc}") from None
            if not refs[-1].path.startswith(self.mountpoint + "/"):
                raise FormatError(self.what, f"nested catalog {path!r} is not below {self.what}")
            if refs[-1].path in seen:
                # "/a/b" and "/a/b/" are one mount point: listed twice, every walk of the tree
                # took both, and a chain of 24 such catalogs made 2**24 visits (gc ran out of
                # memory).
                raise FormatError(self.what, f"nested catalog {refs[-1].path!r} listed twice")
            seen.add(refs[-1].path)
        return refs

    def find_nested(self, path: str) -> NestedRef | None:
        """The direct child catalog whose mount point is ``path`` or a prefix of it (§8.3)."""
        path = _normalise(path)
        for ref in self._nested_refs():  # every lookup asks: no copy
            if path == ref.path or path.startswith(ref.path + "/"):
                return ref
        return None

    def statistics(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in self._query("SELECT counter, value FROM statistics")}
        except (TypeError, ValueError, OverflowError) as exc:  # '1e999' is stored as infinity
            raise FormatError(self.what, f"statistics: {exc}") from None

    def chunk_count(self) -> int:
        """Rows of the ``chunks`` table (``self_chunks`` counts them)."""
        return int(self._query("SELECT count(*) FROM chunks")[0][0])

    def entries(self) -> Iterator[DirectoryEntry]:
        """Every row, with paths rebuilt from the parent links (root first, then depth-first)."""
        stack = [self.mountpoint]
        root = self.lookup(self.mountpoint)
        if root is not None:
            yield root
        while stack:
            directory = stack.pop()
            for entry in self.listing(directory):
                yield entry
                if entry.is_dir and not entry.is_nested_mountpoint:
                    stack.append(entry.path)

    def row_count(self) -> int:
        return int(self._query("SELECT count(*) FROM catalog")[0][0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()
        _OPEN.forget(self)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def referenced_objects(catalog: Catalog) -> Iterator[tuple[Digest, bool, bool]]:
    """Every data object a catalog's files use: ``(digest, is_chunk, compressed)``.

    External files are skipped (their data lives elsewhere, §10.4). Nested catalogs are not
    included: walk them with :func:`walk_catalog_tree`.
    """
    for digest, is_chunk, compressed, _size in sized_objects(catalog):
        yield digest, is_chunk, compressed


def sized_objects(catalog: Catalog) -> Iterator[tuple[Digest, bool, bool, int]]:
    """:func:`referenced_objects` with the content size the catalog gives each object (the
    file's or the chunk's): what a fetch of it may be bounded by. Rows of the wrong types
    raise :class:`~cvmfs_ml.errors.FormatError`."""
    queries = (
        (False, "SELECT hash, flags, size FROM catalog "
                "WHERE hash IS NOT NULL AND NOT (flags & 128)"),
        (True, "SELECT chunks.hash, catalog.flags, chunks.size FROM chunks JOIN catalog "
               "USING (md5path_1, md5path_2) WHERE NOT (catalog.flags & 128)"),
    )  # fmt: skip
    for is_chunk, sql in queries:
        for blob, flags, size in catalog._query(sql):
            if not isinstance(blob, bytes) or type(flags) is not int or type(size) is not int:
                raise FormatError(catalog.what, "an object row has values of the wrong types")
            if size < 0:
                raise FormatError(catalog.what, f"an object has a negative size {size}")
            try:
                algorithm = Algorithm((flags & _HASH_ALGO_MASK) >> _HASH_ALGO_SHIFT)
            except ValueError:
                raise FormatError(catalog.what, f"unknown hash algorithm in {flags}") from None
            yield Digest(algorithm, blob), is_chunk, (flags & _COMPRESSION_MASK) == 0, size


def walk_catalog_tree(
    root: Digest, load: Callable[[str, Digest], Catalog], seen: set[Digest] | None = None
) -> Iterator[tuple[str, Digest, Catalog]]:
    """Depth-first ``(mountpoint, digest, catalog)`` over a root catalog and its nested ones.

    ``load(mountpoint, digest)`` fetches and opens one catalog: the only I/O, supplied by the
    caller (publisher, client, replica), so the traversal itself stays pure. A catalog's children
    are read before it is yielded, so the caller may close it once done with it. Catalogs in
    ``seen`` are skipped with their subtree (the same hash is the same tree: the revisions a
    collection keeps share most of theirs), and the ones walked are added to it.
    """
    stack = [("", root)]
    while stack:
        mountpoint, digest = stack.pop()
        if seen is not None:
            if digest in seen:
                continue
            seen.add(digest)
        catalog = load(mountpoint, digest)
        children = catalog.nested_catalogs()
        yield mountpoint, digest, catalog
        stack.extend((ref.path, ref.digest) for ref in reversed(children))
