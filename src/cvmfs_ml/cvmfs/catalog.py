"""The SQLite file catalog, schema 2.5 revision 7 (cvmfs-format.md §4, §8).

:class:`Catalog` reads a decompressed catalog file; :class:`WritableCatalog` edits one (a copy
made by the publisher) and finalises it (counters, properties) for upload. Rows are keyed by the
split MD5 of the *full* repository path, so nested catalogs use the same keys as the root.

The schema text below is upstream's, character for character (checked against the reference
repository), so ``sqlite_master`` of our catalogs equals upstream's.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, md5_pair
from cvmfs_ml.errors import FormatError

__all__ = [
    "COUNTERS",
    "DEFAULT_TTL",
    "SCHEMA",
    "SCHEMA_REVISION",
    "Catalog",
    "Chunk",
    "DirectoryEntry",
    "Flag",
    "NestedRef",
    "WritableCatalog",
    "decode_text",
    "decode_xattrs",
    "encode_text",
    "encode_xattrs",
    "parent_path",
]

SCHEMA = "2.5"
SCHEMA_REVISION = 7
DEFAULT_TTL = 240
NULL_HASH_HEX = "0" * 40  # previous_revision of a brand-new nested catalog

_SCHEMA_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))",
    "CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER, parent_1 INTEGER, "
    "parent_2 INTEGER, hardlinks INTEGER, hash BLOB, size INTEGER, mode INTEGER, mtime INTEGER, "
    "mtimens INTEGER, flags INTEGER, name TEXT, symlink TEXT, uid INTEGER, gid INTEGER, "
    "xattr BLOB,  CONSTRAINT pk_catalog PRIMARY KEY (md5path_1, md5path_2))",
    "CREATE INDEX idx_catalog_parent ON catalog (parent_1, parent_2)",
    "CREATE TABLE chunks (md5path_1 INTEGER, md5path_2 INTEGER, offset INTEGER, size INTEGER,  "
    "hash BLOB,  CONSTRAINT pk_chunks PRIMARY KEY (md5path_1, md5path_2, offset, size),  "
    "FOREIGN KEY (md5path_1, md5path_2) REFERENCES    catalog(md5path_1, md5path_2))",
    "CREATE TABLE nested_catalogs (path TEXT, sha1 TEXT, size INTEGER, "
    "CONSTRAINT pk_nested_catalogs PRIMARY KEY (path))",
    "CREATE TABLE bind_mountpoints (path TEXT, sha1 TEXT, size INTEGER, "
    "CONSTRAINT pk_bind_mountpoints PRIMARY KEY (path))",
    "CREATE TABLE statistics (counter TEXT, value INTEGER, "
    "CONSTRAINT pk_statistics PRIMARY KEY (counter))",
)

_COUNTER_NAMES = (
    "chunked",
    "chunked_size",
    "chunks",
    "dir",
    "external",
    "external_file_size",
    "file_size",
    "nested",
    "regular",
    "special",
    "symlink",
    "xattr",
)
COUNTERS = tuple(f"{scope}_{name}" for scope in ("self", "subtree") for name in _COUNTER_NAMES)


class Flag(enum.IntFlag):
    """Catalog ``flags`` bits (§4.4; values as the code writes them, not as the docs say)."""

    DIR = 1
    NESTED_MOUNTPOINT = 2
    FILE = 4
    LINK = 8
    SPECIAL = 16
    NESTED_ROOT = 32
    CHUNKED = 64
    EXTERNAL = 128
    UNCOMPRESSED = 0x800
    BIND_MOUNTPOINT = 0x4000
    HIDDEN = 0x8000
    DIRECT_IO = 0x10000


_HASH_ALGO_SHIFT = 8
_HASH_ALGO_MASK = 0x700
_COMPRESSION_MASK = 0x3800


def encode_text(text: str) -> bytes:
    """A name or link target as stored: UTF-8, undecodable bytes (``surrogateescape``) kept.

    Upstream stores names as the bytes the file system gave it; binding them as bytes and casting
    to TEXT stores exactly those bytes, which Python's ``str`` binding would refuse.
    """
    return text.encode("utf-8", "surrogateescape")


def decode_text(raw: bytes) -> str:
    """Inverse of :func:`encode_text` (the connections' ``text_factory``)."""
    return raw.decode("utf-8", "surrogateescape")


def parent_path(path: str) -> str:
    """Upstream's ``GetParentPath``: the text before the last ``/`` (``"/a"`` -> ``""``)."""
    return path[: path.rfind("/")] if path else ""


def _normalise(path: str) -> str:
    """Repository paths are ``""`` for the root and ``/a/b`` otherwise (no trailing slash)."""
    path = "/" + path.strip("/") if path.strip("/") else ""
    if "//" in path or "/./" in path + "/" or "/../" in path + "/":
        raise FormatError("path", f"{path!r} is not a normalised repository path")
    return path


def encode_xattrs(xattrs: Mapping[bytes, bytes] | None) -> bytes | None:
    """The 1-byte-field xattr BLOB (§4.6); ``None`` when there are none (never an empty blob)."""
    if not xattrs:
        return None
    if len(xattrs) > 255:
        raise FormatError("xattrs", f"{len(xattrs)} attributes, at most 255 fit")
    out = bytearray([1, len(xattrs)])
    for key in sorted(xattrs):
        value = xattrs[key]
        if not key or b"\0" in key or len(key) > 255 or len(value) > 255:
            raise FormatError("xattrs", f"attribute {key!r}: keys 1-255 bytes, values <= 255")
        out += bytes([len(key), len(value)]) + key + value
    return bytes(out)


def decode_xattrs(blob: bytes | None) -> dict[bytes, bytes]:
    """Inverse of :func:`encode_xattrs`."""
    if not blob:
        return {}
    if len(blob) < 2 or blob[0] != 1:
        raise FormatError("xattrs", "unknown xattr blob version")
    count, pos, out = blob[1], 2, {}
    for _ in range(count):
        if pos + 2 > len(blob):
            raise FormatError("xattrs", "truncated xattr blob")
        klen, vlen = blob[pos], blob[pos + 1]
        pos += 2
        if pos + klen + vlen > len(blob) or klen == 0:
            raise FormatError("xattrs", "truncated or invalid xattr entry")
        out[bytes(blob[pos : pos + klen])] = bytes(blob[pos + klen : pos + klen + vlen])
        pos += klen + vlen
    return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a chunked file: uncompressed offset and size, object hash (suffix ``P``)."""

    offset: int
    size: int
    digest: Digest


@dataclass(frozen=True, slots=True)
class NestedRef:
    """A ``nested_catalogs`` row: mount point, catalog hash, uncompressed catalog size."""

    path: str
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One ``catalog`` row, with its full repository path."""

    path: str
    mode: int
    size: int = 0
    mtime: int = 0
    flags: int = 0
    digest: Digest | None = None
    symlink: str = ""
    uid: int = 0
    gid: int = 0
    hardlinks: int = 1
    mtimens: int | None = None
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path[self.path.rfind("/") + 1 :] if self.path else ""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_chunked(self) -> bool:
        return bool(self.flags & Flag.CHUNKED)

    @property
    def is_nested_mountpoint(self) -> bool:
        return bool(self.flags & Flag.NESTED_MOUNTPOINT)

    @property
    def is_nested_root(self) -> bool:
        return bool(self.flags & Flag.NESTED_ROOT)

    @property
    def is_compressed(self) -> bool:
        """Whether data objects of this file are zlib streams (bits 11-13 == 0)."""
        return (self.flags & _COMPRESSION_MASK) == 0

    @property
    def hash_algorithm(self) -> Algorithm:
        return Algorithm((self.flags & _HASH_ALGO_MASK) >> _HASH_ALGO_SHIFT)

    @property
    def linkcount(self) -> int:
        return self.hardlinks & 0xFFFFFFFF

    @property
    def hardlink_group(self) -> int:
        return self.hardlinks >> 32

    @staticmethod
    def make_flags(
        mode: int,
        *,
        chunked: bool = False,
        compressed: bool = True,
        algorithm: Algorithm = Algorithm.SHA1,
        has_hash: bool = False,
        extra: int = 0,
    ) -> int:
        """Flags as upstream's ``CreateDatabaseFlags`` computes them from an entry."""
        if stat.S_ISDIR(mode):
            return Flag.DIR | extra
        flags = int(Flag.FILE)
        if stat.S_ISLNK(mode):
            flags |= Flag.LINK
        elif not stat.S_ISREG(mode):
            flags |= Flag.SPECIAL
        if chunked:
            flags |= Flag.CHUNKED
        if has_hash or chunked:
            flags |= algorithm.value << _HASH_ALGO_SHIFT
        if stat.S_ISREG(mode) and not compressed:
            flags |= Flag.UNCOMPRESSED
        return flags | extra


_ROW_COLUMNS = "hardlinks, hash, size, mode, mtime, mtimens, flags, symlink, uid, gid, xattr, name"


_ROW_TYPES: tuple[tuple[str, type, bool], ...] = (
    # (column, type, may be NULL) for the first 11 columns of _ROW_COLUMNS, in order
    ("hardlinks", int, False), ("hash", bytes, True), ("size", int, False),
    ("mode", int, False), ("mtime", int, False), ("mtimens", int, True), ("flags", int, False),
    ("symlink", str, True), ("uid", int, False), ("gid", int, False), ("xattr", bytes, True),
)  # fmt: skip
_NON_NEGATIVE = ("hardlinks", "size", "mode", "flags")
_MAX_INT64 = 2**63 - 1


def _child_path(parent: str, name: object, what: str) -> str:
    """``parent/name``, refusing names that would leave or confuse the tree (a signed catalog
    can still be hostile: ``..`` would send a walk in circles, ``a/b`` reach readdir)."""
    if not isinstance(name, str):
        raise FormatError(what, f"entry name under {parent or '/'!r} is not text: {name!r}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FormatError(what, f"invalid entry name {name!r} under {parent or '/'!r}")
    return f"{parent}/{name}"


def _check_row(path: str, row: tuple, what: str) -> None:
    """Column types and ranges: SQLite stores whatever it is given, whatever the schema says."""
    for (column, kind, nullable), value in zip(_ROW_TYPES, row[:11], strict=True):
        if value is None and nullable:
            continue
        if type(value) is not kind:
            raise FormatError(
                what, f"{path or '/'}: {column} is {type(value).__name__}, not {kind.__name__}"
            )
        if column in _NON_NEGATIVE and not 0 <= value <= _MAX_INT64:
            raise FormatError(what, f"{path or '/'}: {column} {value} is out of range")


def _entry_from_row(path: str, row: tuple, what: str = "catalog") -> DirectoryEntry:
    _check_row(path, row, what)
    hardlinks, blob, size, mode, mtime, mtimens, flags, symlink, uid, gid, xattr = row[:11]
    try:
        algorithm = Algorithm((flags & _HASH_ALGO_MASK) >> _HASH_ALGO_SHIFT)
    except ValueError:
        raise FormatError(what, f"{path or '/'}: unknown hash algorithm in flags {flags}") from None
    return DirectoryEntry(
        path=path,
        mode=mode,
        size=size,
        mtime=mtime,
        flags=flags,
        digest=Digest(algorithm, bytes(blob)) if blob else None,
        symlink=symlink or "",
        uid=uid,
        gid=gid,
        hardlinks=hardlinks,
        mtimens=mtimens,
        xattrs=decode_xattrs(xattr),
    )


class Catalog:
    """A catalog file opened read-only.

    Safe to share between threads (one connection guarded by a lock: queries are short).
    ``mountpoint`` is the repository path of the catalog's root (``""`` for the root catalog).
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
        self._lock = threading.Lock()
        try:
            if raw is None:
                uri = f"file:{self.file}?mode=ro&immutable=1"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:  # held in memory: nothing touches the disk (gc on a full disk)
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
                self._db.deserialize(raw)
            # Upstream stores names and link targets as raw bytes in TEXT columns: bytes that
            # are not UTF-8 come back as surrogates, and encode back to the same bytes.
            self._db.text_factory = decode_text
            self._properties = dict(self._db.execute("SELECT key, value FROM properties"))
            self._columns = {row[1] for row in self._db.execute("PRAGMA table_info(catalog)")}
        except sqlite3.DatabaseError as exc:
            raise FormatError(self.what, f"not a readable catalog: {exc}") from exc
        if "md5path_1" not in self._columns:
            raise FormatError(self.what, "no catalog table")
        prefix = self._properties.get("root_prefix", "")
        self.mountpoint = _normalise(mountpoint if mountpoint is not None else prefix)
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
        try:
            return int(float(self._properties.get(key, default)))
        except ValueError as exc:
            raise FormatError(self.what, f"property {key} is not a number") from exc

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
        return Digest.from_hex(text)

    # -- queries ------------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
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
        return sorted(entries, key=lambda e: e.name)

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
        rows = self._query("SELECT path, sha1, size FROM nested_catalogs ORDER BY path")
        refs = []
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
        return refs

    def find_nested(self, path: str) -> NestedRef | None:
        """The direct child catalog whose mount point is ``path`` or a prefix of it (§8.3)."""
        path = _normalise(path)
        for ref in self.nested_catalogs():
            if path == ref.path or path.startswith(ref.path + "/"):
                return ref
        return None

    def statistics(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in self._query("SELECT counter, value FROM statistics")}
        except (TypeError, ValueError) as exc:
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
            self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WritableCatalog:
    """A catalog file being edited by a publisher.

    Create one fresh with :meth:`create` or open a private copy of a published catalog with
    :meth:`open`. Edits go straight to SQLite (inside one transaction); :meth:`finalize` fills
    counters and properties and closes the file, which is then compressed and uploaded.
    """

    def __init__(self, path: Path, mountpoint: str) -> None:
        self.file = path
        self.mountpoint = _normalise(mountpoint)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.text_factory = decode_text
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute("BEGIN")
        self.dirty_dirs: set[str] = set()

    @classmethod
    def create(cls, path: Path, root: DirectoryEntry, *, nested: bool) -> WritableCatalog:
        """A new catalog holding only its root entry (flags 1 for the root, 33 if nested)."""
        if path.exists():
            path.unlink()
        db = sqlite3.connect(path)
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=DELETE")
        for statement in _SCHEMA_SQL:
            db.execute(statement)
        db.executemany(
            "INSERT INTO properties (key, value) VALUES (?, ?)",
            [("schema", SCHEMA), ("schema_revision", str(SCHEMA_REVISION))],
        )
        db.executemany(
            "INSERT INTO statistics (counter, value) VALUES (?, 0)", [(c,) for c in COUNTERS]
        )
        db.commit()
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
        self._db.execute("COMMIT")
        self._db.execute("VACUUM")
        self._db.close()
        return counters

    def abort(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        self._db.close()


def totals(counters: Mapping[str, int]) -> dict[str, int]:
    """What a child catalog contributes to its parent's ``subtree_*``: self + subtree."""
    return {
        f"subtree_{name}": int(counters.get(f"self_{name}", 0))
        + int(counters.get(f"subtree_{name}", 0))
        for name in _COUNTER_NAMES
    }


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
    root: Digest, load: Callable[[str, Digest], Catalog]
) -> Iterator[tuple[str, Digest, Catalog]]:
    """Depth-first ``(mountpoint, digest, catalog)`` over a root catalog and its nested ones.

    ``load(mountpoint, digest)`` fetches and opens one catalog: the only I/O, supplied by the
    caller (publisher, client, replica), so the traversal itself stays pure.
    """
    stack = [("", root)]
    while stack:
        mountpoint, digest = stack.pop()
        catalog = load(mountpoint, digest)
        yield mountpoint, digest, catalog
        stack.extend((ref.path, ref.digest) for ref in reversed(catalog.nested_catalogs()))
