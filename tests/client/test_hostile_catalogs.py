"""Hostile catalogs give FormatError: a valid signature only says who signed, not that it is sane.

Each case takes a freshly published catalog, spoils one row with SQL (entry names ``..``,
``.``, ``""``, ``a/b``, NUL, two of one name in a folder; a size stored as text; a negative
size; impossible chunk lists; a hash stored as text), stores it as the root catalog and points
the manifest at it. The repository is opened with ``verify=False`` (the signature is beside the
point: the publisher could have signed exactly these bytes) and every reader path must raise
FormatError; ``walk()`` must end rather than loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.catalog import Catalog, md5_pair
from cvmfs_ml.cvmfs.hashing import Algorithm
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate, inflate, object_path
from cvmfs_ml.errors import FormatError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.local import LocalStore

FQRN = "catalog.test"
BIG = bytes(range(256)) * 4096  # 1 MiB, chunked below


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    root = tmp_path_factory.mktemp("catalogs")
    settings = PublishSettings(
        min_chunk_size=64 * 1024, avg_chunk_size=128 * 1024, max_chunk_size=256 * 1024, workers=1
    )
    publisher = create_repository(root / "srv", FQRN, settings=settings)
    with publisher.transaction() as txn:
        txn.add_bytes("/dir/file.txt", b"content")
        txn.add_bytes("/dir/sub/deep.txt", b"deep")
        txn.add_bytes("/big.bin", BIG)
        txn.commit()
    return publisher


@pytest.fixture
def spoiled(published: Publisher, tmp_path: Path) -> Callable[[str, tuple], Repository]:
    """``spoiled(sql, args)``: a Repository whose root catalog had ``sql`` applied (once for
    each tuple when ``args`` is a list)."""
    opened: list[Repository] = []

    def make(sql: str, args: tuple | list[tuple] = ()) -> Repository:
        store = LocalStore(published.repo_dir)
        manifest = published.manifest()
        raw = inflate(store.get_bytes(object_path(manifest.catalog, ObjectKind.CATALOG)))
        plain = tmp_path / f"catalog{len(opened)}.db"
        plain.write_bytes(raw)
        with sqlite3.connect(plain) as db:
            if isinstance(args, list):  # one row each
                db.executemany(sql, args)
            else:
                db.execute(sql, args)
        db.close()
        digest = store.put_object(deflate(plain.read_bytes()), ObjectKind.CATALOG, Algorithm.SHA1)
        # an unsigned manifest naming the spoiled catalog, beside the genuine repository
        override = tmp_path / f"manifest{len(opened)}"
        override.write_bytes(dataclasses.replace(manifest, catalog=digest).body())
        source = _ManifestOverride(store, override)
        repo = Repository(source, FQRN, verify=False, cache=None)
        opened.append(repo)
        return repo

    yield make  # type: ignore[misc]
    for repo in opened:
        repo.close()


class _ManifestOverride:
    """The real store, answering ``.cvmfspublished`` with another (unsigned) manifest."""

    def __init__(self, store: LocalStore, manifest: Path) -> None:
        self.store = store
        self.manifest = manifest

    def fetch(self, rel_path: str, expected: object, **options: object) -> bytes:
        if rel_path == ".cvmfspublished":
            return self.manifest.read_bytes()
        return self.store.fetch(rel_path, expected, **options)  # type: ignore[arg-type]

    def fetch_into(self, *args: object, **options: object) -> int:
        return self.store.fetch_into(*args, **options)  # type: ignore[arg-type]


def rename(path: str, name: str) -> tuple[str, tuple]:
    return "UPDATE catalog SET name = ? WHERE md5path_1 = ? AND md5path_2 = ?", (
        name,
        *md5_pair(path),
    )


def bounded_walk(repo: Repository) -> list[str]:
    return [e.path for e in itertools.islice(repo.walk(), 10_000)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\0b"])
def test_bad_entry_names(spoiled: Callable[..., Repository], name: str) -> None:
    repo = spoiled(*rename("/dir/sub", name))
    with pytest.raises(FormatError, match="invalid entry name"):
        repo.listdir("/dir")
    with pytest.raises(FormatError, match="invalid entry name"):
        bounded_walk(repo)


def test_dot_dot_in_the_root_listing(spoiled: Callable[..., Repository]) -> None:
    repo = spoiled(*rename("/dir", ".."))
    with pytest.raises(FormatError):
        repo.listdir("/")
    with pytest.raises(FormatError):
        bounded_walk(repo)


def test_duplicate_names_in_a_directory(spoiled: Callable[..., Repository]) -> None:
    """Two rows of one folder with one name (a row whose md5path is not its path's hash):
    before, both were listed, and a lookup found one of them."""
    repo = spoiled("UPDATE catalog SET name = 'file.txt' WHERE name = 'sub'")
    with pytest.raises(FormatError, match=r"two entries named 'file\.txt' under '/dir'"):
        repo.listdir("/dir")
    with pytest.raises(FormatError, match="two entries named"):
        bounded_walk(repo)


def duplicated_folders(copies: int, depth: int) -> tuple[str, list[tuple]]:
    """Rows for ``copies`` folders named ``d`` in ``/dir``, in each ``/dir/d``, and so on
    ``depth`` levels down: a catalog of copies * depth rows."""
    rows = []
    for level in range(depth):
        parent = md5_pair("/dir" + "/d" * level)
        rows += [(2**40 + level * copies + n, level, *parent) for n in range(copies)]
    sql = (
        "INSERT INTO catalog (md5path_1, md5path_2, parent_1, parent_2, hardlinks, size, mode, "
        "mtime, flags, name, uid, gid) VALUES (?, ?, ?, ?, 2, 4096, 16877, 0, 1, 'd', 0, 0)"
    )
    return sql, rows


@pytest.mark.timeout(120)
def test_duplicated_folders_cannot_make_a_walk_explode(
    spoiled: Callable[..., Repository],
) -> None:
    """Before, a walk of every row (``Catalog.entries``: ``repo check``) listed each copy of a
    folder again: 8 copies on 8 levels (64 rows) made 8**8 (16.8 million) folders to list. It
    now stops at the first duplicate."""
    repo = spoiled(*duplicated_folders(8, 8))
    assert isinstance(repo.root, Catalog)
    with pytest.raises(FormatError, match="two entries named 'd' under '/dir'"):
        for _ in itertools.islice(repo.root.entries(), 100_000):
            pass


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("UPDATE catalog SET size = 'big' WHERE name = 'file.txt'", "size is str, not int"),
        ("UPDATE catalog SET size = -5 WHERE name = 'file.txt'", "size -5 is out of range"),
        ("UPDATE catalog SET mode = 1.5 WHERE name = 'file.txt'", "mode is float"),
        ("UPDATE catalog SET hash = 'abc' WHERE name = 'file.txt'", "hash is str"),
        ("UPDATE catalog SET symlink = x'00ff' WHERE name = 'file.txt'", "symlink is bytes"),
        ("UPDATE catalog SET flags = 4 | (7 << 8) WHERE name = 'file.txt'", "algorithm"),
    ],
)
def test_wrong_column_types_and_ranges(
    spoiled: Callable[..., Repository], sql: str, match: str
) -> None:
    repo = spoiled(sql)
    with pytest.raises(FormatError, match=match):
        repo.stat("/dir/file.txt")
    with pytest.raises(FormatError, match=match):
        repo.listdir("/dir")
    assert repo.read_bytes("/big.bin") == BIG  # the rest of the tree still reads


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE chunks SET size = 0 WHERE offset = 0",
        "UPDATE chunks SET size = -1 WHERE offset = 0",
        "UPDATE chunks SET offset = offset + 1 WHERE offset > 0",
        "UPDATE chunks SET size = 'x' WHERE offset = 0",
        "UPDATE chunks SET hash = 'text' WHERE offset = 0",
        "UPDATE chunks SET hash = x'0011' WHERE offset = 0",
        "DELETE FROM chunks WHERE offset > 0",
    ],
)
def test_impossible_chunk_lists(spoiled: Callable[..., Repository], sql: str) -> None:
    repo = spoiled(sql)
    assert repo.stat("/big.bin").is_chunked
    with pytest.raises(FormatError, match="chunk"):
        repo.read_bytes("/big.bin")
    assert repo.read_bytes("/dir/file.txt") == b"content"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO nested_catalogs (path, sha1, size) VALUES ('/dir', 'nothex', 0)",
        "INSERT INTO nested_catalogs (path, sha1, size) VALUES ('', '" + "a" * 40 + "', 0)",
        "INSERT INTO nested_catalogs (path, sha1, size) VALUES ('/dir', '" + "a" * 40 + "', -1)",
        "INSERT INTO nested_catalogs (path, sha1, size) VALUES ('/d/../x', '" + "a" * 40 + "', 1)",
    ],
)
def test_bad_nested_catalog_rows(spoiled: Callable[..., Repository], sql: str) -> None:
    repo = spoiled(sql)
    with pytest.raises(FormatError):
        repo.stat("/dir/file.txt")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("schema_revision", "1e999", "property schema_revision '1e999' is not a number"),
        ("schema_revision", "inf", "property schema_revision 'inf' is not a number"),
        ("schema_revision", None, "property schema_revision None is not a number"),
        ("TTL", b"\xff", r"property TTL b'\\xff' is not a number"),
        ("previous_revision", "zz", "property previous_revision 'zz' is not a hash"),
    ],
)
def test_bad_catalog_properties(
    spoiled: Callable[..., Repository], key: str, value: object, match: str
) -> None:
    """Before, a schema_revision of '1e999' or 'inf' (a float too large for an int) stopped
    every reader (ls, check, replica sync) with an OverflowError traceback, a NULL one with a
    TypeError; a previous_revision that is no hash was refused without naming the catalog."""
    with pytest.raises(FormatError, match=match) as caught:
        repo = spoiled("UPDATE properties SET value = ? WHERE key = ?", (value, key))
        repo.ttl  # noqa: B018 - read the TTL (the root catalog's property)
        assert repo.root.previous_revision is not None
    assert "catalog" in str(caught.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (rename("/dir/sub", ".."), "invalid entry name '..' under '/dir'"),
        (rename("/dir/sub", "a/b"), "invalid entry name 'a/b' under '/dir'"),
        (duplicated_folders(8, 8), "two entries named 'd' under '/dir'"),
        (("UPDATE catalog SET size = 'big' WHERE name = 'file.txt'", ()), "size is str"),
        (("INSERT INTO nested_catalogs (path, sha1, size) VALUES ('/dir', 'nothex', 0)", ()),
         "nothex"),
        # '1e999' in the INTEGER column is stored as a REAL infinity: an OverflowError before
        (("UPDATE statistics SET value = '1e999' WHERE counter = 'self_regular'", ()),
         "statistics"),
    ],
)  # fmt: skip
def test_check_reports_a_hostile_catalog_and_checks_the_rest(
    spoiled: Callable[..., Repository], spoil: tuple[str, Any], match: str
) -> None:
    """``repo check`` collects problems: before, a catalog whose rows could not be walked
    (a hostile name, a duplicated folder, a bad nested reference) ended the whole check with
    that one error, and nothing else was checked; an infinite counter, with a traceback. It is
    now one problem of the report, and the data objects are still checked."""
    from cvmfs_ml.client.check import check_repository

    report = check_repository(spoiled(*spoil))
    assert not report.ok
    assert [p for p in report.problems if match in p], report.problems
    assert len(report.problems) == len(set(report.problems)), report.problems  # each once
    assert report.objects >= 3, report  # file.txt, deep.txt and the chunks of big.bin


def test_a_genuine_catalog_passes_every_check(published: Publisher) -> None:
    store = LocalStore(published.repo_dir)
    manifest: Manifest = published.manifest()
    key = published.keys.paths.master_public.read_bytes()
    with Repository(store, FQRN, public_keys=[key]) as r:
        assert sorted(bounded_walk(r)) == [
            "/big.bin", "/dir", "/dir/file.txt", "/dir/sub", "/dir/sub/deep.txt"
        ]  # fmt: skip
        assert r.root_hash == manifest.catalog
        assert isinstance(r.root, Catalog)
