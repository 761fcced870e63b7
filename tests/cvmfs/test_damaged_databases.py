"""A damaged SQLite file from outside gives our error, whatever SQLite's message holds.

Python's ``sqlite3`` decodes SQLite's error text as UTF-8. A message that quotes the damaged
schema (``malformed database schema (properties) - near "CR\\x80EATE"``) then raises
``UnicodeDecodeError`` instead of ``sqlite3.DatabaseError``, and that slipped past every
``except sqlite3.DatabaseError`` of the readers: the catalog fuzzer found it
(``tests/client/test_fuzz_parsers.py::test_catalog_bytes`` on a fresh machine).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.catalog import Catalog
from cvmfs_ml.cvmfs.history import HistoryDb
from cvmfs_ml.cvmfs.reflog import Reflog
from cvmfs_ml.errors import FormatError


def _schema_damaged(path: Path, statement: bytes) -> Path:
    """``path`` with one byte of ``statement`` (as SQLite stores it) made non-UTF-8."""
    data = path.read_bytes()
    at = data.index(statement)
    assert data.count(statement) == 1
    path.write_bytes(data[: at + 2] + b"\x80" + data[at + 3 :])
    return path


def _database(path: Path, *statements: str) -> Path:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return path


def test_catalog_with_a_non_utf8_schema_is_a_format_error(tmp_path: Path) -> None:
    path = _database(
        tmp_path / "catalog.db",
        "CREATE TABLE properties (key TEXT, value TEXT)",
        "CREATE TABLE catalog (md5path_1 INTEGER, md5path_2 INTEGER)",
    )
    _schema_damaged(path, b"CREATE TABLE properties")
    with pytest.raises(FormatError, match="not a readable catalog"):
        Catalog(path)
    with pytest.raises(FormatError, match="not a readable catalog"):
        Catalog(path, raw=path.read_bytes())


def test_history_and_reflog_with_a_non_utf8_schema_are_format_errors(tmp_path: Path) -> None:
    history = HistoryDb.create(tmp_path / "history.db", "damaged.test")
    history.close()
    _schema_damaged(tmp_path / "history.db", b"CREATE TABLE properties")
    with pytest.raises(FormatError):
        HistoryDb.open(tmp_path / "history.db")
    with pytest.raises(FormatError):
        HistoryDb.from_bytes((tmp_path / "history.db").read_bytes())

    reflog = Reflog.create(tmp_path / "reflog.db", "damaged.test")
    reflog.close()
    _schema_damaged(tmp_path / "reflog.db", b"CREATE TABLE properties")
    with pytest.raises(FormatError):
        Reflog.open(tmp_path / "reflog.db")
