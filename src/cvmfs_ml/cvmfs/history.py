"""The tag database, object kind ``H`` (cvmfs-format.md §9.1; mirrors cvmfs/history_sql.cc).

An SQLite file, schema 1.0 revision 3: ``tags`` (one row per named snapshot), ``branches``
(only the trunk row ``('', NULL, 0)``), an empty ``recycle_bin`` and the ``properties`` table
with ``schema``, ``schema_revision``, ``fqrn`` and ``previous_revision`` (the hex of the previous
history object, zeros for the first). The ``CREATE`` statements below are the exact text
upstream stores in ``sqlite_master``, checked against the reference repository's H objects.

Tags name root catalogs: ``trunk`` is the head, ``trunk-previous`` the one before; clients use
the database only for ``CVMFS_REPOSITORY_TAG``/``CVMFS_REPOSITORY_DATE``. The file is published
zlib-compressed; this module works on the uncompressed file at a path the caller chooses.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cvmfs_ml.cvmfs.hashing import DIGEST_SIZE, Algorithm, Digest
from cvmfs_ml.errors import SQLITE_DAMAGE, FormatError, PublishError

__all__ = [
    "SCHEMA",
    "SCHEMA_REVISION",
    "TRUNK",
    "TRUNK_PREVIOUS",
    "HistoryDb",
    "Tag",
    "check_tag_name",
]

TRUNK = "trunk"
TRUNK_PREVIOUS = "trunk-previous"
SCHEMA = "1.0"
SCHEMA_REVISION = 3

_TAG_NAME = re.compile(r"[A-Za-z0-9_./:-]+")  # upstream's TagSanitizer: "az AZ 09 - _ . / :"


def check_tag_name(name: str) -> None:
    """Refuse a tag name upstream's publisher refuses (``Publisher::CheckTagName``): empty,
    ``trunk`` or ``trunk-previous`` (the publisher moves those), or other characters than
    letters, digits and ``-_./:``."""
    if name in (TRUNK, TRUNK_PREVIOUS):
        raise PublishError(f"{name!r} is maintained by the publisher, not a tag name to give")
    if not _TAG_NAME.fullmatch(name):
        raise PublishError(f"invalid tag name {name!r:.80}: use letters, digits and - _ . / :")


_PROPERTIES_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))"
)
_BRANCHES_SQL = (
    "CREATE TABLE branches (branch TEXT, parent TEXT, initial_revision INTEGER, "
    " CONSTRAINT pk_branch PRIMARY KEY (branch), "
    "  FOREIGN KEY (parent) REFERENCES branches (branch), "
    "  CHECK ((branch <> '') OR (parent IS NULL)), "
    "  CHECK ((branch = '') OR (parent IS NOT NULL)))"
)
_TAGS_SQL = (
    "CREATE TABLE tags (name TEXT, hash TEXT, revision INTEGER, "
    "  timestamp INTEGER, channel INTEGER, description TEXT, size INTEGER, "
    "  branch TEXT, CONSTRAINT pk_tags PRIMARY KEY (name), "
    "  FOREIGN KEY (branch) REFERENCES branches (branch))"
)
_RECYCLE_BIN_SQL = (
    "CREATE TABLE recycle_bin (hash TEXT, flags INTEGER,   CONSTRAINT pk_hash PRIMARY KEY (hash))"
)
_TAG_COLUMNS = ("name", "hash", "revision", "timestamp", "channel", "description", "size", "branch")


@dataclass(frozen=True)
class Tag:
    """A named snapshot: a root catalog with its revision and publish time."""

    name: str
    root_catalog: Digest
    """Root catalog hash (stored as hex without the ``C`` suffix)."""
    revision: int
    timestamp: int
    """Unix seconds."""
    channel: int = 0
    """Always 0 in current upstream (update channels were dropped)."""
    description: str = ""
    size: int = 0
    """Size of the uncompressed root catalog in bytes."""
    branch: str = ""
    """``''`` is the trunk, the only branch stock tools create."""


def _checked_columns(db: sqlite3.Connection, target: object) -> frozenset[str]:
    """The tags table's columns, after checking the schema (closes ``db`` on a bad one)."""
    try:
        schema = _property(db, "schema", f"history {target}")
        if schema is None or _schema_version(schema) != float(SCHEMA):
            raise FormatError(f"history {target}", f"schema {schema!r}, expected {SCHEMA}")
        columns = frozenset(row[1] for row in db.execute("PRAGMA table_info(tags)"))
        if not {"name", "hash", "revision", "timestamp"} <= columns:
            raise FormatError(f"history {target}", "no usable tags table")
    except BaseException:
        db.close()
        raise
    return columns


class HistoryDb:
    """An open tag database. Use :meth:`create` or :meth:`open`; close it (or use ``with``).

    Writes commit at once, and the file stays a plain rollback-journal database
    (``journal_mode=DELETE``), so once :meth:`close` returns it can be compressed and uploaded.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        writable: bool,
        columns: frozenset[str] = frozenset(_TAG_COLUMNS),
    ) -> None:
        self._db = connection
        self._columns = columns
        self.path = path
        self.writable = writable

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        fqrn: str,
        previous: Digest | None = None,
        *,
        algorithm: Algorithm = Algorithm.SHA1,
    ) -> HistoryDb:
        """A new, empty database at ``path`` (which must not exist yet), open for writing.

        ``previous`` is the previous history object; ``None`` writes the null hash of
        ``algorithm`` (all zeros), which is what mkfs stores for the first revision.
        """
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"refusing to overwrite {target}")
        db = sqlite3.connect(target, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("BEGIN")
            db.execute(_PROPERTIES_SQL)
            db.execute(_BRANCHES_SQL)
            db.execute(_TAGS_SQL)
            db.execute(_RECYCLE_BIN_SQL)
            db.executemany(
                "INSERT INTO properties (key, value) VALUES (?, ?)",
                [
                    ("schema", SCHEMA),
                    ("schema_revision", str(SCHEMA_REVISION)),
                    ("fqrn", fqrn),
                    ("previous_revision", _previous_text(previous, algorithm)),
                ],
            )
            db.execute(
                "INSERT INTO branches (branch, parent, initial_revision) VALUES ('', NULL, 0)"
            )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            target.unlink(missing_ok=True)
            raise
        return cls(db, target, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> HistoryDb:
        """Open an existing database (read-only unless ``writable``); checks the schema."""
        target = Path(path)
        if not target.is_file():
            raise FormatError(f"history {target}", "no such file")
        mode = "rw" if writable else "ro"
        db = sqlite3.connect(
            f"{target.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None
        )
        return cls(db, target, writable=writable, columns=_checked_columns(db, target))

    @classmethod
    def from_bytes(cls, raw: bytes, what: str = "history") -> HistoryDb:
        """A read-only database held in memory: nothing touches the disk (gc on a full disk)."""
        db = sqlite3.connect(":memory:", isolation_level=None)
        try:
            db.deserialize(raw)
        except SQLITE_DAMAGE as exc:
            db.close()
            raise FormatError(what, f"not a history database: {exc}") from exc
        return cls(db, Path(what), writable=False, columns=_checked_columns(db, what))

    def close(self) -> None:
        """Close the file; every write is already committed."""
        self._db.close()

    def __enter__(self) -> HistoryDb:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def fqrn(self) -> str | None:
        return _property(self._db, "fqrn", self._what)

    @property
    def schema_revision(self) -> int:
        value = _property(self._db, "schema_revision", self._what)
        try:
            return int(value or 0)
        except ValueError as exc:
            raise FormatError(self._what, f"schema_revision {value!r} is not a number") from exc

    @property
    def previous_revision(self) -> Digest | None:
        """The previous history object, ``None`` for the first one (stored as zeros)."""
        text = _property(self._db, "previous_revision", self._what)
        if not text:
            return None
        try:
            digest = Digest.from_hex(text)
        except FormatError as exc:
            raise FormatError(self._what, f"previous_revision: {exc.reason}") from exc
        return None if digest.raw == bytes(DIGEST_SIZE) else digest

    def set_previous_revision(
        self, previous: Digest | None, *, algorithm: Algorithm = Algorithm.SHA1
    ) -> None:
        """Record the history object this one succeeds (done on every publish)."""
        self._require_writable()
        self._db.execute(
            "INSERT OR REPLACE INTO properties (key, value) VALUES ('previous_revision', ?)",
            (_previous_text(previous, algorithm),),
        )

    def tags(self) -> list[Tag]:
        """Every tag, newest first (by timestamp, then revision, then name)."""
        rows = self._db.execute(
            f"SELECT {self._select} FROM tags ORDER BY timestamp DESC, revision DESC, name"
        )
        return [self._tag(row) for row in rows]

    def get(self, name: str) -> Tag | None:
        """The tag called ``name``, or ``None``."""
        row = self._db.execute(
            f"SELECT {self._select} FROM tags WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else self._tag(row)

    def by_date(self, timestamp: int) -> Tag | None:
        """The newest trunk tag published at or before ``timestamp`` (``CVMFS_REPOSITORY_DATE``)."""
        branch = "AND branch = ''" if "branch" in self._columns else ""
        row = self._db.execute(
            f"SELECT {self._select} FROM tags WHERE timestamp <= ? {branch} "
            "ORDER BY timestamp DESC, revision DESC LIMIT 1",
            (timestamp,),
        ).fetchone()
        return None if row is None else self._tag(row)

    def set(self, tag: Tag) -> None:
        """Insert ``tag``, replacing any tag of the same name."""
        self._require_writable()
        if self.schema_revision != SCHEMA_REVISION:
            raise FormatError(self._what, f"can only write schema revision {SCHEMA_REVISION}")
        if not tag.name:
            raise FormatError(self._what, "a tag needs a name")
        known = self._db.execute(
            "SELECT 1 FROM branches WHERE branch = ?", (tag.branch,)
        ).fetchone()
        if known is None:
            raise FormatError(self._what, f"tag {tag.name!r} names unknown branch {tag.branch!r}")
        self._db.execute(
            f"INSERT OR REPLACE INTO tags ({', '.join(_TAG_COLUMNS)}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tag.name,
                tag.root_catalog.hex,
                tag.revision,
                tag.timestamp,
                tag.channel,
                tag.description,
                tag.size,
                tag.branch,
            ),
        )

    def remove(self, name: str) -> bool:
        """Delete the tag called ``name``; returns whether it existed."""
        self._require_writable()
        return self._db.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount > 0

    @property
    def _what(self) -> str:
        return f"history {self.path}"

    @property
    def _select(self) -> str:
        """Select every tag column; older schema revisions lack ``size`` or ``branch``."""
        return ", ".join(c if c in self._columns else "NULL" for c in _TAG_COLUMNS)

    def _tag(self, row: tuple) -> Tag:
        """One row as a Tag, each column checked: SQLite stores whatever it is given."""
        name, hash_text, revision, timestamp, channel, description, size, branch = row
        if not isinstance(name, str) or not name:
            raise FormatError(self._what, f"a tag name is {type(name).__name__}: {name!r}")
        try:
            root = Digest.from_hex(hash_text)
        except (FormatError, TypeError) as exc:
            raise FormatError(self._what, f"tag {name!r}: bad hash {hash_text!r}") from exc
        numbers = {"revision": revision, "timestamp": timestamp, "channel": channel, "size": size}
        for column, value in numbers.items():
            if value is not None and (type(value) is not int or not 0 <= value < 2**63):
                raise FormatError(self._what, f"tag {name!r}: {column} {value!r} is not a count")
        for column, value in (("description", description), ("branch", branch)):
            if value is not None and not isinstance(value, str):
                raise FormatError(self._what, f"tag {name!r}: {column} {value!r} is not text")
        return Tag(
            name=name,
            root_catalog=root,
            revision=revision or 0,
            timestamp=timestamp or 0,
            channel=channel or 0,
            description=description or "",
            size=size or 0,
            branch=branch or "",
        )

    def _require_writable(self) -> None:
        if not self.writable:
            raise FormatError(
                self._what, "opened read-only; use HistoryDb.open(path, writable=True)"
            )


def _previous_text(previous: Digest | None, algorithm: Algorithm) -> str:
    if previous is None:
        return Digest(algorithm, bytes(DIGEST_SIZE)).hex
    return previous.hex


def _schema_version(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0


def _property(db: sqlite3.Connection, key: str, what: str) -> str | None:
    try:
        row = db.execute("SELECT value FROM properties WHERE key = ?", (key,)).fetchone()
    except SQLITE_DAMAGE as exc:
        raise FormatError(what, f"not a CVMFS SQLite database: {exc}") from exc
    return None if row is None else str(row[0])
