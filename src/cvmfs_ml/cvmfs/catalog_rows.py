"""The catalog's schema and what its rows mean (schema 2.5 revision 7; cvmfs-format.md §4, §8).

The schema text below is upstream's, character for character (checked against the reference
repository), so ``sqlite_master`` of our catalogs equals upstream's. Rows are keyed by the split
MD5 of the *full* repository path, so nested catalogs use the same keys as the root. The reader
(:mod:`cvmfs_ml.cvmfs.catalog`) and the writer (:mod:`cvmfs_ml.cvmfs.catalog_writer`) share
everything here; import the public names from :mod:`cvmfs_ml.cvmfs.catalog`.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest
from cvmfs_ml.errors import FormatError

__all__ = [
    "COUNTERS",
    "DEFAULT_TTL",
    "NULL_HASH_HEX",
    "SCHEMA",
    "SCHEMA_REVISION",
    "Chunk",
    "DirectoryEntry",
    "Flag",
    "NestedRef",
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


NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})
"""The extended attributes of nearly every entry: one shared, read-only empty mapping (an empty
dict per entry was 64 bytes of each listing, inode table and catalog walk entry)."""


def decode_xattrs(blob: bytes | None) -> Mapping[bytes, bytes]:
    """Inverse of :func:`encode_xattrs`."""
    if not blob:
        return NO_XATTRS
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
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)

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
_NON_NEGATIVE = ("hardlinks", "size", "flags")
_MAX_INT64 = 2**63 - 1
_UINT32 = ("mode", "uid", "gid")  # mode_t, uid_t, gid_t: a stat() of anything else overflows
_MAX_UINT32 = 2**32 - 1
_MAX_NANOSECONDS = 999_999_999  # mtimens is the nanosecond part only (format §4.3)


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
        if column in _UINT32 and not 0 <= value <= _MAX_UINT32:
            raise FormatError(what, f"{path or '/'}: {column} {value} is out of range")
        if column == "mtimens" and not 0 <= value <= _MAX_NANOSECONDS:
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
