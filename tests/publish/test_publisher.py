"""Publishing revisions: nested catalogs, removal, tags, rollback, gc, settings, locking."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.catalog import Flag
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import LockedError, PublishError
from cvmfs_ml.publish.gc import collect_garbage
from cvmfs_ml.publish.repository import Publisher


def reader(publisher: Publisher) -> Repository:
    return Repository.open(publisher.repo_dir, public_key=publisher.keys.paths.master_public)


def assert_clean(publisher: Publisher) -> None:
    with reader(publisher) as repo:
        report = check_repository(repo)
    assert report.ok, report.problems


def weights(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n // 2, dtype=np.float32) * 0.02).astype(np.float16).tobytes()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "tree"
    (src / "models" / "m" / "1").mkdir(parents=True)
    (src / "models" / "m" / "1" / ".cvmfscatalog").write_bytes(b"")
    (src / "models" / "m" / "1" / "weights.bin").write_bytes(weights(1_000_000))
    (src / "models" / "m" / "1" / "config.json").write_text('{"hidden": 64}\n' * 100)
    (src / "README").write_text("hello\n")
    os.symlink("models/m/1", src / "current")
    return src


def test_publish_creates_nested_catalogs_and_reads_back(make_repo, tree: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        result = txn.commit(tag="first")
    assert result.revision == 1
    with reader(publisher) as repo:
        assert repo.stat("/models/m/1").flags == Flag.DIR | Flag.NESTED_MOUNTPOINT
        assert [r.path for r in repo.root.nested_catalogs()] == ["/models/m/1"]
        data = repo.read_bytes("/models/m/1/weights.bin")
        assert data == (tree / "models/m/1/weights.bin").read_bytes()
        assert repo.layout("/models/m/1/weights.bin").chunked
        assert repo.readlink("/current") == "models/m/1"
        assert repo.stat("/models").linkcount == 3  # 2 + the subdirectory m
    assert_clean(publisher)


def test_republishing_unchanged_content_writes_no_objects(make_repo, tree: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        first = txn.commit()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        again = txn.commit()
    assert first.stats.objects_new > 3
    assert again.stats.objects_new == 0
    # Unchanged files are not even read again: the file cache knows what they became.
    assert again.stats.files_unchanged == again.stats.files == first.stats.files
    assert again.revision == first.revision + 1
    assert_clean(publisher)


def test_the_file_cache_does_not_sync_every_row(tmp_path: Path) -> None:
    """One row per published file, each its own commit: with SQLite's default FULL sync in WAL
    mode every row was an fsync, and a publish of 50,000 small files spent 8 of its 25 s there
    (13 s in all now). NORMAL never corrupts a WAL database; a power cut may lose the last
    rows, which only means reading those files again."""
    from cvmfs_ml.publish.filecache import FileCache
    from cvmfs_ml.publish.settings import PublishSettings

    cache = FileCache(tmp_path / "files.db", PublishSettings())
    try:
        assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cache._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        cache.close()


def test_a_changed_file_is_read_again(make_repo, tree: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit()
    weights = tree / "models/m/1/weights.bin"
    data = bytearray(weights.read_bytes())
    data[123_456] ^= 0xFF  # same size, same second: only the content (and ctime) change
    weights.write_bytes(bytes(data))
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        result = txn.commit()
    assert result.stats.files_unchanged == result.stats.files - 1
    assert result.stats.objects_new >= 1
    with reader(publisher) as repo:
        assert repo.read_bytes("/models/m/1/weights.bin") == bytes(data)
    # Objects removed behind the cache's back (gc) are noticed: the file is read again.
    for rel in list(publisher.store.list_objects()):
        if rel.endswith("P"):
            publisher.store.remove(rel)
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        healed = txn.commit()
    assert healed.stats.objects_new > 0
    assert_clean(publisher)


def test_only_touched_catalogs_are_rewritten(make_repo, tree: Path, tmp_path: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit()
    with reader(publisher) as repo:
        nested_before = repo.root.nested_catalogs()[0].digest
    other = tmp_path / "other"
    other.mkdir()
    (other / "note.txt").write_text("unrelated\n")
    with publisher.transaction() as txn:
        txn.add_folder(other, "/notes")
        txn.commit()
    with reader(publisher) as repo:
        assert repo.root.nested_catalogs()[0].digest == nested_before
        assert repo.read_bytes("/notes/note.txt") == b"unrelated\n"
    assert_clean(publisher)


def test_remove_paths_and_nested_catalogs(make_repo, tree: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit()
    with publisher.transaction() as txn:
        txn.remove("/models/m/1")
        txn.remove("/README")
        txn.commit()
    with reader(publisher) as repo:
        assert not repo.exists("/models/m/1")
        assert not repo.exists("/README")
        assert repo.root.nested_catalogs() == []
        stats = repo.root.statistics()
        assert stats["subtree_regular"] == 0 and stats["self_nested"] == 0
    assert_clean(publisher)
    with publisher.transaction() as txn, pytest.raises(PublishError, match="no such path"):
        txn.remove("/does/not/exist")
        txn.commit()


def test_tags_rollback_and_garbage_collection(make_repo, tree: Path, tmp_path: Path) -> None:
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(tree, "/")
        txn.commit(tag="v1")
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "weights.bin").write_bytes(weights(300_000, seed=7))
    with publisher.transaction() as txn:
        txn.remove("/models")
        txn.add_folder(changed, "/models/m/2", nested_catalog=True)
        txn.commit(tag="v2")
    assert {t.name for t in publisher.tags()} >= {"v1", "v2", "trunk", "trunk-previous"}

    result = publisher.rollback("v1")
    assert result.revision == 3
    with reader(publisher) as repo:
        assert repo.revision == 3
        assert repo.exists("/models/m/1/weights.bin") and not repo.exists("/models/m/2")
    assert_clean(publisher)

    # v2's weights are referenced by tag v2 and trunk-previous: gc keeps them.
    collect_garbage(publisher)
    with Repository.open(
        publisher.repo_dir, public_key=publisher.keys.paths.master_public, tag="v2"
    ) as v2:
        assert v2.read_bytes("/models/m/2/weights.bin") == (changed / "weights.bin").read_bytes()
    publisher.remove_tag("v2")
    publisher.tag("keep", "named again")  # moves trunk-previous away from v2 too
    with publisher.transaction() as txn:
        txn.mkdir("/empty")
        txn.commit()
    report = collect_garbage(publisher)
    assert report.removed > 0 and report.bytes_removed > 200_000  # v2's compressed weights
    assert_clean(publisher)


def test_compression_settings_and_auto(make_repo, tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "weights.bin").write_bytes(weights(400_000))
    (src / "config.json").write_text('{"a": 1}\n' * 2000)
    for compression, weight_compressed in (
        (Compression.AUTO, False),
        (Compression.NONE, False),
        (Compression.ZLIB, True),
        (Compression.FAST_ZLIB, True),
    ):
        publisher = make_repo(compression=compression)
        with publisher.transaction() as txn:
            txn.add_folder(src, "/")
            txn.commit()
        with reader(publisher) as repo:
            w = repo.stat("/weights.bin")
            c = repo.stat("/config.json")
            assert w.is_compressed == weight_compressed, compression
            assert bool(w.flags & Flag.UNCOMPRESSED) == (not weight_compressed)
            assert c.is_compressed == (compression is not Compression.NONE), compression
            assert repo.read_bytes("/weights.bin") == (src / "weights.bin").read_bytes()
            if (
                compression is Compression.FAST_ZLIB
            ):  # isal output is a zlib stream any reader inflates
                piece = repo.layout(w).pieces[0]
                stored = (
                    publisher.repo_dir / repo_object(piece.digest, repo.layout(w))
                ).read_bytes()
                assert zlib.decompress(stored) == (src / "weights.bin").read_bytes()[: piece.size]
        assert_clean(publisher)


def test_direct_writes_follow_server_conf(make_repo, tmp_path: Path) -> None:
    """``CVMFS_ML_DIRECT_WRITES``: a local repository's large objects go around the page cache
    by default, and through it when the server.conf says false (a server with memory to spare,
    whose Stratum 1s then read them from memory); the setting reaches publishers opened later."""
    from cvmfs_ml.bench.residency import drops_written_pages, resident_fraction
    from cvmfs_ml.publish.settings import load_settings, settings_path

    mib = 2**20
    publisher = make_repo(compression=Compression.NONE, min_chunk_size=2 * mib,
                          avg_chunk_size=4 * mib, max_chunk_size=8 * mib)  # fmt: skip
    assert publisher.settings.direct_writes and publisher.store.direct_writes

    def publish_residency(name: str) -> list[float]:
        """Publish a file; how much of each of its objects of 1 MiB or more is cached."""
        src = tmp_path / name
        src.mkdir()
        (src / "w.bin").write_bytes(os.urandom(12 * mib))
        with publisher.transaction() as txn:
            txn.add_folder(src, f"/{name}")
            txn.commit()
        with reader(publisher) as repo:
            layout = repo.layout(f"/{name}/w.bin")
            paths = [publisher.repo_dir / repo_object(p.digest, layout) for p in layout.pieces]
            large = [path for path in paths if path.stat().st_size >= mib]  # not the tail
            assert large
            residency = [resident_fraction(path) for path in large]  # before any read
            assert repo.read_bytes(f"/{name}/w.bin") == (src / "w.bin").read_bytes()
        return residency

    around = publish_residency("around")
    publisher.save_settings(publisher.settings.with_(direct_writes=False))
    conf = settings_path(publisher.keys_dir, publisher.fqrn).read_text()
    assert "CVMFS_ML_DIRECT_WRITES=false" in conf
    assert not load_settings(publisher.keys_dir, publisher.fqrn).direct_writes
    publisher = Publisher.open(publisher.repo_dir, publisher.keys_dir)  # a later publish
    assert not publisher.store.direct_writes
    through = publish_residency("through")
    if drops_written_pages(publisher.repo_dir):  # a file system that shows the difference
        assert max(around) == 0.0
        assert min(through) >= 0.9  # (a page or two reclaimed under memory pressure)
    publisher.save_settings(publisher.settings.with_(direct_writes=True))  # and back, at once
    assert publisher.store.direct_writes
    assert_clean(publisher)


def repo_object(digest, layout) -> str:
    from cvmfs_ml.cvmfs.objects import object_path

    return object_path(digest, layout.kind)


def test_dirtab_makes_nested_catalogs(make_repo, tmp_path: Path) -> None:
    src = tmp_path / "dt"
    for version in ("1", "2"):
        (src / "sw" / "pkg" / version).mkdir(parents=True)
        (src / "sw" / "pkg" / version / "lib.so").write_bytes(version.encode() * 100)
    (src / "sw" / "pkg" / "skip").mkdir()
    (src / ".cvmfsdirtab").write_text("# one catalog per version\n/sw/pkg/*\n! /sw/pkg/skip\n")
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    with reader(publisher) as repo:
        assert [r.path for r in repo.root.nested_catalogs()] == ["/sw/pkg/1", "/sw/pkg/2"]
        assert repo.stat("/sw/pkg/1/.cvmfscatalog").size == 0
    assert_clean(publisher)


def test_tarball_publish(make_repo, tmp_path: Path, tree: Path) -> None:
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tree, arcname=".")
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_tarball(tarball, "/from-tar")
        txn.commit()
    with reader(publisher) as repo:
        data = repo.read_bytes("/from-tar/models/m/1/weights.bin")
        expected = (tree / "models/m/1/weights.bin").read_bytes()
        assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
        assert repo.stat("/from-tar/models/m/1").is_nested_mountpoint
    assert_clean(publisher)


def test_special_names_symlinks_and_modes(make_repo, tmp_path: Path) -> None:
    src = tmp_path / "odd"
    src.mkdir()
    (src / "name with space ü ñ 日本.txt").write_text("unicode\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o755)
    os.symlink("/absolute/dangling", src / "dangling")
    (src / "empty").write_bytes(b"")
    os.mkfifo(src / "fifo")
    publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    with reader(publisher) as repo:
        assert repo.read_bytes("/name with space ü ñ 日本.txt") == b"unicode\n"
        assert stat.S_IMODE(repo.stat("/run.sh").mode) == 0o755
        assert repo.readlink("/dangling") == "/absolute/dangling"
        assert repo.stat("/dangling").flags == Flag.FILE | Flag.LINK
        assert repo.read_bytes("/empty") == b""
        assert repo.stat("/fifo").flags == Flag.FILE | Flag.SPECIAL
    assert_clean(publisher)


def test_lock_serialises_publishers(make_repo) -> None:
    publisher = make_repo()
    other = Publisher.open(publisher.repo_dir)
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with publisher.transaction():
            entered.set()
            release.wait(60)  # set as soon as the test checked the lock

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(60)
    try:
        with pytest.raises(LockedError), other.transaction(wait=False):
            pass
    finally:
        release.set()
        thread.join()
    with other.transaction(wait=False) as txn:
        txn.mkdir("/after")
        assert txn.commit().revision == 1


def test_file_size_limit_warns(make_repo, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "w.bin").write_bytes(b"\0" * (2 * 2**20 + 1))
    publisher = make_repo(file_mbyte_limit=2)
    with publisher.transaction() as txn, pytest.warns(UserWarning, match="CVMFS_FILE_MBYTE_LIMIT"):
        txn.add_folder(src, "/")
        txn.commit()


def test_gc_reads_each_catalog_of_the_kept_revisions_once_and_holds_one_at_a_time(
    make_repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tagged revisions share most nested catalogs: each catalog is fetched once (every tag's
    tree was walked whole, each catalog kept in memory until the end: 5 revisions of 3000
    small catalogs took 1.7 GB)."""
    from cvmfs_ml.cvmfs import catalog as catalog_module

    publisher = make_repo("gcwalk.test")
    src = tmp_path / "src"
    for i in range(6):
        (src / f"v{i}").mkdir(parents=True)
        (src / f"v{i}" / ".cvmfscatalog").touch()
        (src / f"v{i}" / "w.bin").write_text(str(i))
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit(tag="t0")
    for revision in range(1, 4):  # only /v0 changes: the other five catalogs stay shared
        (src / "v0" / "w.bin").write_text(f"changed {revision}")
        with publisher.transaction() as txn:
            txn.add_folder(src / "v0", "/v0")
            txn.commit(tag=f"t{revision}")
    fetched: list[str] = []
    open_now, most_open = [0], [0]
    real_fetch, real_init, real_close = (
        publisher.store.fetch, catalog_module.Catalog.__init__, catalog_module.Catalog.close
    )  # fmt: skip

    def fetch(rel: str, *args: object, **kwargs: object) -> bytes:
        if rel.endswith("C"):
            fetched.append(rel)
        return real_fetch(rel, *args, **kwargs)  # type: ignore[arg-type]

    def init(self: catalog_module.Catalog, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        open_now[0] += 1
        most_open[0] = max(most_open[0], open_now[0])

    def close(self: catalog_module.Catalog) -> None:
        open_now[0] -= 1
        real_close(self)

    monkeypatch.setattr(publisher.store, "fetch", fetch)
    monkeypatch.setattr(catalog_module.Catalog, "__init__", init)
    monkeypatch.setattr(catalog_module.Catalog, "close", close)
    report = collect_garbage(publisher, dry_run=True)
    # 4 revisions kept (by tags t0-t3), each its own root and /v0 catalog, and the five
    # other nested catalogs shared by all of them
    assert len(fetched) == len(set(fetched)) == 4 + 4 + 5
    assert most_open[0] == 1 and open_now[0] == 0
    assert report.older_tags[:3] == (("t0", 1), ("t1", 2), ("t2", 3))
