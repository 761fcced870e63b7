"""The reflog ``.cvmfsreflog`` (cvmfs-format.md §9.2; mirrors cvmfs/reflog_sql.cc).

An SQLite file, schema 1.0 revision 0, listing every root catalog, certificate, history and
meta-info object ever published, so garbage collection and replication know what is reachable.
``refs(hash, type, timestamp)`` keys rows by the hex hash (no object suffix); ``properties``
holds ``schema``, ``schema_revision`` and ``fqrn``. The ``CREATE`` statements are the exact text
of the reference repository's reflog.

Unlike every other auxiliary object the reflog is uploaded **uncompressed** to the repository
root, and the manifest's ``Y`` is the hash of the raw file (pitfall 1).
"""

from __future__ import annotations

import enum
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType

from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import ObjectKind
from cvmfs_ml.errors import SQLITE_DAMAGE, FormatError

__all__ = ["SCHEMA", "SCHEMA_REVISION", "RefType", "Reflog"]

SCHEMA = "1.0"
SCHEMA_REVISION = 0

_PROPERTIES_SQL = (
    "CREATE TABLE properties (key TEXT, value TEXT, CONSTRAINT pk_properties PRIMARY KEY (key))"
)
_REFS_SQL = (
    "CREATE TABLE refs (hash TEXT, type INTEGER, timestamp INTEGER, "
    "CONSTRAINT pk_refs PRIMARY KEY (hash))"
)


class RefType(enum.IntEnum):
    """The ``type`` column (upstream's ``ReferenceType``)."""

    CATALOG = 0
    CERTIFICATE = 1
    HISTORY = 2
    METAINFO = 3

    @property
    def object_kind(self) -> ObjectKind:
        """The object suffix of such a reference (``C``, ``X``, ``H``, ``M``)."""
        return _KINDS[self]


_KINDS = {
    RefType.CATALOG: ObjectKind.CATALOG,
    RefType.CERTIFICATE: ObjectKind.CERTIFICATE,
    RefType.HISTORY: ObjectKind.HISTORY,
    RefType.METAINFO: ObjectKind.METAINFO,
}


class Reflog:
    """An open reflog. Use :meth:`create` or :meth:`open`; close it (or use ``with``).

    Each change commits at once and the file stays in rollback-journal mode, so after
    :meth:`close` its bytes are final and can be hashed for the manifest's ``Y``.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path, writable: bool) -> None:
        self._db = connection
        self.path = path
        self.writable = writable

    @classmethod
    def create(cls, path: str | os.PathLike[str], fqrn: str) -> Reflog:
        """A new, empty reflog at ``path`` (which must not exist yet), open for writing."""
        target = Path(path)
        if target.exists():
            raise FileExistsError(f"refusing to overwrite {target}")
        db = sqlite3.connect(target, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("BEGIN")
            db.execute(_PROPERTIES_SQL)
            db.execute(_REFS_SQL)
            db.executemany(
                "INSERT INTO properties (key, value) VALUES (?, ?)",
                [("schema", SCHEMA), ("schema_revision", str(SCHEMA_REVISION)), ("fqrn", fqrn)],
            )
            db.execute("COMMIT")
        except BaseException:
            db.close()
            target.unlink(missing_ok=True)
            raise
        return cls(db, target, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> Reflog:
        """Open an existing reflog (read-only unless ``writable``); checks the schema."""
        target = Path(path)
        what = f"reflog {target}"
        if not target.is_file():
            raise FormatError(what, "no such file")
        mode = "rw" if writable else "ro"
        db = sqlite3.connect(
            f"{target.resolve().as_uri()}?mode={mode}", uri=True, isolation_level=None
        )
        try:
            try:
                row = db.execute("SELECT value FROM properties WHERE key = 'schema'").fetchone()
                columns = {r[1] for r in db.execute("PRAGMA table_info(refs)")}
            except SQLITE_DAMAGE as exc:
                raise FormatError(what, f"not a CVMFS SQLite database: {exc}") from exc
            if row is None or str(row[0]) != SCHEMA:
                raise FormatError(what, f"schema {row and row[0]!r}, expected {SCHEMA}")
            if not {"hash", "type", "timestamp"} <= columns:
                raise FormatError(what, "no refs table")
        except BaseException:
            db.close()
            raise
        return cls(db, target, writable=writable)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Reflog:
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
        row = self._db.execute("SELECT value FROM properties WHERE key = 'fqrn'").fetchone()
        return None if row is None else str(row[0])

    def add(self, digest: Digest, ref_type: RefType, *, timestamp: int | None = None) -> None:
        """Record a reference (replacing the row of the same hash, as upstream does).

        ``timestamp`` defaults to now; pass it to make the file reproducible.
        """
        self._require_writable()
        when = int(time.time()) if timestamp is None else timestamp
        self._db.execute(
            "INSERT OR REPLACE INTO refs (hash, type, timestamp) VALUES (?, ?, ?)",
            (digest.hex, int(ref_type), when),
        )

    def contains(self, digest: Digest, ref_type: RefType | None = None) -> bool:
        """Whether ``digest`` is recorded (with ``ref_type``, if given)."""
        if ref_type is None:
            row = self._db.execute("SELECT 1 FROM refs WHERE hash = ?", (digest.hex,)).fetchone()
        else:
            row = self._db.execute(
                "SELECT 1 FROM refs WHERE hash = ? AND type = ?", (digest.hex, int(ref_type))
            ).fetchone()
        return row is not None

    def list(self, ref_type: RefType, *, older_than: int | None = None) -> list[Digest]:
        """References of one type, newest first (upstream's order); optionally only older ones."""
        query = "SELECT hash FROM refs WHERE type = ?"
        args: tuple[int, ...] = (int(ref_type),)
        if older_than is not None:
            query += " AND timestamp < ?"
            args += (older_than,)
        rows = self._db.execute(query + " ORDER BY timestamp DESC, rowid DESC", args)
        result = []
        for (text,) in rows:
            try:
                result.append(Digest.from_hex(text))
            except FormatError as exc:
                raise FormatError(f"reflog {self.path}", f"bad hash {text!r}") from exc
        return result

    def remove(self, digest: Digest, ref_type: RefType) -> bool:
        """Forget a reference (garbage collection); returns whether it was there."""
        self._require_writable()
        cursor = self._db.execute(
            "DELETE FROM refs WHERE hash = ? AND type = ?", (digest.hex, int(ref_type))
        )
        return cursor.rowcount > 0

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM refs").fetchone()[0])

    def _require_writable(self) -> None:
        if not self.writable:
            raise FormatError(f"reflog {self.path}", "opened read-only; use writable=True")
