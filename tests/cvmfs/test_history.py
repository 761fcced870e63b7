"""The tag database: read upstream's H objects, write files with upstream's exact schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes
from cvmfs_ml.cvmfs.history import TRUNK, TRUNK_PREVIOUS, HistoryDb, Tag
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, inflate, object_path
from cvmfs_ml.errors import FormatError

FQRN = "ref.test.local"
# From the fixture README: revision -> root catalog
ROOT_R1 = Digest.from_hex("9d33f37a784de911b5e43f04e07f1533160c888d")
ROOT_V1 = Digest.from_hex("90b61445795acf2846e71eb07579d200eae4a1e0")
ROOT_V2 = Digest.from_hex("f423a05b8928434eebf9698fb5b8a15211eb724a")
# The three history objects of the reference repository, oldest first
H_FIRST = Digest.from_hex("ed6d1d4d1b02f59f35ede0f1da0eebcb894c1084")
H_SECOND = Digest.from_hex("0ff483c685a0f0a350c551a95692c6791d25f5c4")
H_HEAD = Digest.from_hex("38fc79918ac69e44204bfb8b8f86279326bfbc6c")


def _inflate_history(served: Path, digest: Digest, folder: Path) -> Path:
    target = folder / f"{digest.hex}.sqlite"
    if not target.exists():
        target.write_bytes(inflate((served / object_path(digest, ObjectKind.HISTORY)).read_bytes()))
    return target


@pytest.fixture(scope="module")
def history_files(reference_served: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("history")
    return {d: _inflate_history(reference_served, d, folder) for d in (H_FIRST, H_SECOND, H_HEAD)}


def _schema(path: Path) -> list[tuple]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    finally:
        db.close()


def _properties(path: Path) -> list[tuple]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT key, value FROM properties ORDER BY rowid").fetchall()
    finally:
        db.close()


# --- the reference repository ------------------------------------------------------------


def test_manifest_history_resolves_tags(reference_served: Path, history_files) -> None:
    manifest = Manifest.parse((reference_served / ".cvmfspublished").read_bytes())
    assert manifest.history == H_HEAD
    with HistoryDb.open(history_files[H_HEAD]) as history:
        assert history.fqrn == FQRN
        assert history.get("v1").root_catalog == ROOT_V1
        assert history.get("v2").root_catalog == ROOT_V2
        assert history.get(TRUNK).root_catalog == ROOT_V2 == manifest.catalog
        assert history.get(TRUNK_PREVIOUS).root_catalog == ROOT_V1
        assert history.get("no-such-tag") is None
        v2 = history.get("v2")
        assert (v2.revision, v2.timestamp, v2.size, v2.channel, v2.branch) == (
            3,
            1795304909,
            57344,
            0,
            "",
        )
        assert v2.description == "content revision 2: modify/add/remove"
        assert [t.name for t in history.tags()] == [TRUNK, "v2", TRUNK_PREVIOUS, "v1"]
        assert history.by_date(1795304908).root_catalog == ROOT_V1
        assert history.by_date(1795304909).root_catalog == ROOT_V2
        assert history.by_date(1000) is None
        assert history.schema_revision == 3


def test_previous_revision_chain(history_files) -> None:
    chain = []
    current: Digest | None = H_HEAD
    while current is not None:
        chain.append(current)
        with HistoryDb.open(history_files[current]) as history:
            current = history.previous_revision
    assert chain == [H_HEAD, H_SECOND, H_FIRST]
    with HistoryDb.open(history_files[H_FIRST]) as first:
        assert [(t.name, t.root_catalog) for t in first.tags()] == [(TRUNK, ROOT_R1)]
    with HistoryDb.open(history_files[H_SECOND]) as second:
        assert second.get(TRUNK_PREVIOUS).root_catalog == ROOT_R1
        assert second.get("v1").root_catalog == ROOT_V1


def test_read_only_open_refuses_writes(history_files) -> None:
    with HistoryDb.open(history_files[H_HEAD]) as history:
        tag = Tag("x", ROOT_V1, 1, 1)
        with pytest.raises(FormatError, match="read-only"):
            history.set(tag)
        with pytest.raises(FormatError, match="read-only"):
            history.remove("v1")
        with pytest.raises(FormatError, match="read-only"):
            history.set_previous_revision(None)


# --- writing -------------------------------------------------------------------------------


def test_created_file_matches_upstream_schema(history_files, tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    HistoryDb.create(path, FQRN).close()
    assert _schema(path) == _schema(history_files[H_HEAD])
    assert _properties(path) == [
        ("schema", "1.0"),
        ("schema_revision", "3"),
        ("fqrn", FQRN),
        ("previous_revision", "0" * 40),
    ]
    assert [key for key, _ in _properties(path)] == [
        k for k, _ in _properties(history_files[H_FIRST])
    ]
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT * FROM branches").fetchall() == [("", None, 0)]
        assert db.execute("SELECT count(*) FROM recycle_bin").fetchone() == (0,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        db.close()
    header = path.read_bytes()[:20]
    assert header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x01\x01"  # not WAL
    assert not (tmp_path / "new.sqlite-journal").exists()
    assert not (tmp_path / "new.sqlite-wal").exists()


def test_tags_set_get_replace_remove(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    previous = hash_bytes(b"previous history")
    root1, root2 = hash_bytes(b"root 1"), hash_bytes(b"root 2")
    with HistoryDb.create(path, FQRN, previous) as history:
        assert history.previous_revision == previous
        history.set(Tag(TRUNK, root1, 1, 100, description="current HEAD", size=4096))
        history.set(Tag("v1", root1, 1, 100, description="first"))
        history.set(Tag(TRUNK_PREVIOUS, root1, 1, 100))
        history.set(Tag(TRUNK, root2, 2, 200, description="current HEAD", size=8192))
        assert history.get(TRUNK) == Tag(TRUNK, root2, 2, 200, 0, "current HEAD", 8192, "")
        assert len(history.tags()) == 3
        assert history.remove("v1") is True
        assert history.remove("v1") is False
        with pytest.raises(FormatError, match="unknown branch"):
            history.set(Tag("b", root1, 1, 1, branch="feature"))
        with pytest.raises(FormatError, match="name"):
            history.set(Tag("", root1, 1, 1))
        history.set_previous_revision(None)
        assert history.previous_revision is None
    with HistoryDb.open(path, writable=True) as history:
        assert {t.name for t in history.tags()} == {TRUNK, TRUNK_PREVIOUS}
        history.set(Tag("v2", root2, 2, 200))
    with HistoryDb.open(path) as history:
        assert history.get("v2").root_catalog == root2
    # the stored hash is plain hex, no object suffix
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT hash FROM tags WHERE name = 'v2'").fetchone() == (root2.hex,)
    finally:
        db.close()


def test_other_algorithm_null_previous(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with HistoryDb.create(path, FQRN, algorithm=Algorithm.SHAKE128) as history:
        assert history.previous_revision is None
        history.set(Tag(TRUNK, hash_bytes(b"r", Algorithm.SHAKE128), 1, 1))
        assert history.get(TRUNK).root_catalog.algorithm is Algorithm.SHAKE128
    assert _properties(path)[3] == ("previous_revision", "0" * 40 + "-shake128")


def test_bad_files(tmp_path: Path) -> None:
    existing = tmp_path / "exists.sqlite"
    existing.write_bytes(b"")
    with pytest.raises(FileExistsError):
        HistoryDb.create(existing, FQRN)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(FormatError, match="not a CVMFS SQLite"):
        HistoryDb.open(garbage)
    with pytest.raises(FormatError, match="no such file"):
        HistoryDb.open(tmp_path / "missing.sqlite")
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE properties (key TEXT, value TEXT)")
    db.execute("INSERT INTO properties VALUES ('schema', '2.5')")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match="schema"):
        HistoryDb.open(other)
