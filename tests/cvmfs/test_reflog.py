"""The reflog: read upstream's ``.cvmfsreflog`` and write files with its exact schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind
from cvmfs_ml.cvmfs.reflog import Reflog, RefType
from cvmfs_ml.errors import FormatError

FQRN = "ref.test.local"
REFERENCE_ROOTS = {
    Digest.from_hex(h)
    for h in (
        "883085f6f0f44d22c81b908fa5e5db9afa1d6d7f",  # revision 0 (mkfs)
        "9d33f37a784de911b5e43f04e07f1533160c888d",  # revision 1
        "90b61445795acf2846e71eb07579d200eae4a1e0",  # revision 2, v1
        "f423a05b8928434eebf9698fb5b8a15211eb724a",  # revision 3, v2
    )
}


def _schema(path: Path) -> list[tuple]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    finally:
        db.close()


def test_reference_reflog_lists_everything(reference_served: Path) -> None:
    manifest = Manifest.parse((reference_served / ".cvmfspublished").read_bytes())
    with Reflog.open(reference_served / ".cvmfsreflog") as reflog:
        assert reflog.fqrn == FQRN
        catalogs = reflog.list(RefType.CATALOG)
        assert set(catalogs) == REFERENCE_ROOTS and len(catalogs) == 4
        assert catalogs[-1] == Digest.from_hex("883085f6f0f44d22c81b908fa5e5db9afa1d6d7f")
        assert reflog.list(RefType.CERTIFICATE) == [manifest.certificate]
        assert reflog.list(RefType.METAINFO) == [manifest.metainfo]
        assert manifest.history in reflog.list(RefType.HISTORY)
        assert len(reflog.list(RefType.HISTORY)) == 3
        assert reflog.contains(manifest.catalog, RefType.CATALOG)
        assert reflog.contains(manifest.catalog)
        assert not reflog.contains(manifest.catalog, RefType.HISTORY)
        assert reflog.count() == 9
        assert set(reflog.list(RefType.CATALOG, older_than=1795304909)) == {
            Digest.from_hex("883085f6f0f44d22c81b908fa5e5db9afa1d6d7f"),
            Digest.from_hex("9d33f37a784de911b5e43f04e07f1533160c888d"),
        }
        with pytest.raises(FormatError, match="read-only"):
            reflog.add(hash_bytes(b"x"), RefType.CATALOG)


def test_manifest_y_is_hash_of_raw_reflog(reference_served: Path) -> None:
    manifest = Manifest.parse((reference_served / ".cvmfspublished").read_bytes())
    assert manifest.reflog == hash_bytes((reference_served / ".cvmfsreflog").read_bytes())


def test_created_file_matches_upstream_schema(reference_served: Path, tmp_path: Path) -> None:
    path = tmp_path / "reflog.sqlite"
    Reflog.create(path, FQRN).close()
    assert _schema(path) == _schema(reference_served / ".cvmfsreflog")
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT key, value FROM properties ORDER BY rowid").fetchall() == [
            ("schema", "1.0"),
            ("schema_revision", "0"),
            ("fqrn", FQRN),
        ]
    finally:
        db.close()
    assert path.read_bytes()[18:20] == b"\x01\x01"
    assert not (tmp_path / "reflog.sqlite-journal").exists()


def test_add_contains_list_remove(tmp_path: Path) -> None:
    path = tmp_path / "reflog.sqlite"
    a, b, c = hash_bytes(b"a"), hash_bytes(b"b"), hash_bytes(b"c")
    with Reflog.create(path, FQRN) as reflog:
        reflog.add(a, RefType.CATALOG, timestamp=100)
        reflog.add(b, RefType.CATALOG, timestamp=200)
        reflog.add(c, RefType.HISTORY, timestamp=150)
        reflog.add(a, RefType.CATALOG, timestamp=300)  # re-adding refreshes, no duplicate
        assert reflog.list(RefType.CATALOG) == [a, b]  # newest first, like upstream
        assert reflog.list(RefType.HISTORY) == [c]
        assert reflog.list(RefType.METAINFO) == []
        assert reflog.count() == 3
        assert reflog.remove(c, RefType.HISTORY) is True
        assert reflog.remove(c, RefType.HISTORY) is False
        reflog.add(hash_bytes(b"now"), RefType.METAINFO)  # default timestamp: the clock
    with Reflog.open(path, writable=True) as reflog:
        assert not reflog.contains(c)
        assert reflog.contains(a, RefType.CATALOG)
        assert len(reflog.list(RefType.METAINFO)) == 1
    db = sqlite3.connect(path)
    try:
        assert db.execute(
            "SELECT hash, type, timestamp FROM refs WHERE hash = ?", (a.hex,)
        ).fetchone() == (
            a.hex,
            0,
            300,
        )
    finally:
        db.close()


def test_ref_type_values() -> None:
    assert [int(t) for t in RefType] == [0, 1, 2, 3]
    assert [t.object_kind for t in RefType] == [
        ObjectKind.CATALOG,
        ObjectKind.CERTIFICATE,
        ObjectKind.HISTORY,
        ObjectKind.METAINFO,
    ]


def test_bad_files(tmp_path: Path) -> None:
    existing = tmp_path / "exists"
    existing.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        Reflog.create(existing, FQRN)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(FormatError):
        Reflog.open(garbage)
    with pytest.raises(FormatError, match="no such file"):
        Reflog.open(tmp_path / "missing")
