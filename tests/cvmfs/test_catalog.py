"""The catalog codec: keys, flags, xattrs, counters, and read -> write -> read identity."""

from __future__ import annotations

import shutil
import sqlite3
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvmfs_ml.cvmfs.catalog import (
    Catalog,
    DirectoryEntry,
    WritableCatalog,
    decode_xattrs,
    encode_xattrs,
    parent_path,
)
from cvmfs_ml.cvmfs.hashing import md5_pair
from cvmfs_ml.errors import FormatError

ROOT_CATALOG = "f423a05b8928434eebf9698fb5b8a15211eb724a"


@pytest.fixture
def reference_catalog(reference_served: Path, tmp_path: Path) -> Path:
    stored = reference_served / "data" / ROOT_CATALOG[:2] / (ROOT_CATALOG[2:] + "C")
    path = tmp_path / "root.db"
    path.write_bytes(zlib.decompress(stored.read_bytes()))
    return path


def test_md5_path_vectors() -> None:
    # cvmfs-format.md §4.2 (python-cvmfsutils' vector and the spec's own examples).
    path = (
        "/lib/lhcb/ALIGNMENT/ALIGNMENT_v9r2/Phys/CommonParticles/tests/qmtest/"
        "commonparticles.qms/.svn/tmp/prop-base"
    )
    assert md5_pair(path) == (4069996547627848455, -3471940481646685085)
    assert md5_pair("") == (338333539836370388, 9098107892288553193)
    assert md5_pair("/software") == (3445601412511816508, 6267067367417020806)
    assert parent_path("/a") == "" and parent_path("/a/b") == "/a"


def test_flags_as_upstream_writes_them() -> None:
    assert DirectoryEntry.make_flags(0o120777) == 12  # symlink = 4 | 8
    assert DirectoryEntry.make_flags(0o100644, chunked=True) == 68
    assert DirectoryEntry.make_flags(0o100644, has_hash=True, compressed=False) == 4 | 0x800
    assert DirectoryEntry.make_flags(0o010644) == 20  # FIFO: special
    assert DirectoryEntry.make_flags(0o040755) == 1


@given(
    st.dictionaries(
        st.binary(min_size=1, max_size=255).filter(lambda k: b"\0" not in k),
        st.binary(max_size=255),
        max_size=20,
    )
)
def test_xattr_blob_round_trip(xattrs: dict[bytes, bytes]) -> None:
    blob = encode_xattrs(xattrs)
    assert (blob is None) == (not xattrs)  # NULL, never an empty blob (pitfall 14)
    assert decode_xattrs(blob) == xattrs
    if blob:
        assert blob[0] == 1 and blob[1] == len(xattrs)


def test_xattr_limits_and_garbage() -> None:
    with pytest.raises(FormatError):
        encode_xattrs({b"k" * 256: b"v"})
    with pytest.raises(FormatError):
        decode_xattrs(b"\x02\x01")
    with pytest.raises(FormatError):
        decode_xattrs(b"\x01\x01\x05\x05ab")


def test_read_write_read_identity(reference_catalog: Path, tmp_path: Path) -> None:
    """Rows read from upstream's catalog, written into a fresh one, read back identical."""
    with Catalog(reference_catalog, "") as upstream:
        entries = list(upstream.entries())
        chunks = {e.path: upstream.chunks(e) for e in entries if e.is_chunked}
        nested = upstream.nested_catalogs()
        stats = upstream.statistics()
    copy = tmp_path / "copy.db"
    writable = WritableCatalog.create(copy, entries[0], nested=False)
    for entry in entries[1:]:
        writable.put(entry)
        if entry.path in chunks:
            writable.put_chunks(entry.path, chunks[entry.path])
    for ref in nested:
        writable.set_nested(ref)
    subtree = {k: v for k, v in stats.items() if k.startswith("subtree_")}
    counters = writable.finalize(
        revision=3, last_modified=1, previous_revision=None, subtree=subtree, ttl=240
    )
    assert counters == stats
    with Catalog(copy, "") as ours:
        assert list(ours.entries()) == entries
        assert {p: ours.chunks(p) for p in chunks} == chunks
        assert ours.nested_catalogs() == nested
        assert ours.statistics() == stats
    with sqlite3.connect(copy) as a, sqlite3.connect(reference_catalog) as b:
        query = "SELECT * FROM catalog ORDER BY md5path_1, md5path_2"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_corrupt_catalog_file_raises_format_error(reference_catalog: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.db"
    shutil.copy(reference_catalog, broken)
    broken.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(FormatError, match="catalog"):
        Catalog(broken, "")


def test_chunks_must_tile(reference_catalog: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    shutil.copy(reference_catalog, bad)
    with sqlite3.connect(bad) as db:
        db.execute("DELETE FROM chunks WHERE offset = 777557")
    with Catalog(bad, "") as catalog, pytest.raises(FormatError, match="tile"):
        catalog.chunks("/big/random-24MiB.bin")


def _nested_catalog_of(reference_served: Path, root: Path, tmp_path: Path) -> Path:
    """The reference root catalog's one nested catalog (upstream wrote it), decompressed."""
    with Catalog(root) as catalog:
        (ref,) = catalog.nested_catalogs()
    stored = reference_served / "data" / ref.digest.hex[:2] / (ref.digest.hex[2:] + "C")
    path = tmp_path / "nested.db"
    path.write_bytes(zlib.decompress(stored.read_bytes()))
    return path


def test_a_nested_catalog_must_be_mounted_where_its_root_prefix_says(
    reference_served: Path, reference_catalog: Path, tmp_path: Path
) -> None:
    """Upstream writes ``root_prefix`` into nested catalogs (not the root one): a catalog listed
    under /moved that was made for /nested showed /nested's tree under /moved, silently."""
    nested = _nested_catalog_of(reference_served, reference_catalog, tmp_path)
    with Catalog(nested) as catalog:
        assert catalog.mountpoint == "/nested"
    with Catalog(nested, "/nested") as catalog:
        assert catalog.mountpoint == "/nested"
    with pytest.raises(FormatError, match="root_prefix '/nested' != mount point '/moved'"):
        Catalog(nested, "/moved")
    with pytest.raises(FormatError, match="root_prefix"):
        Catalog(nested, "")  # not a root catalog either
    with Catalog(reference_catalog, "") as root:  # no root_prefix: the caller's word stands
        assert root.mountpoint == ""


def test_a_nested_catalog_listed_twice_is_refused(reference_catalog: Path) -> None:
    """``/nested`` and ``/nested/`` are one mount point: a catalog listing both made every walk
    visit the subtree twice, and a chain of 24 of them 2**24 times (gc ran out of memory)."""
    with sqlite3.connect(reference_catalog) as db:
        path, sha1, size = db.execute("SELECT path, sha1, size FROM nested_catalogs").fetchone()
        db.execute("INSERT INTO nested_catalogs VALUES (?, ?, ?)", (path + "/", sha1, size))
        db.execute("INSERT INTO nested_catalogs VALUES ('/nested-x', ?, ?)", (sha1, size))
    db.close()
    with Catalog(reference_catalog) as catalog, pytest.raises(FormatError, match="listed twice"):
        catalog.nested_catalogs()
