"""The object cache: layout, atomic commits, quota and LRU, pins, corruption, several processes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import ALWAYS_VERIFY_BYTES, ObjectCache, crc32
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.objects import parse_object_path
from cvmfs_ml.errors import ConfigError

REPO_DIR = Path("/work/shared/fixtures/cvmfs-reference-repo/cvmfs/ref.test.local")
FORK = multiprocessing.get_context("fork")


def obj(content: bytes) -> tuple[Digest, bytes]:
    """A digest named like a CVMFS object (SHA-1 of the zlib stream) and its content."""
    return hash_bytes(zlib.compress(content, 6)), content


def numbered(i: int, size: int) -> tuple[Digest, bytes]:
    return obj(i.to_bytes(4, "big") * (size // 4))


def reference_objects() -> list[tuple[Digest, bytes]]:
    out = []
    for path in sorted((REPO_DIR / "data").rglob("*")):
        if path.is_file():
            digest, _ = parse_object_path(path.relative_to(REPO_DIR).as_posix())
            out.append((digest, zlib.decompress(path.read_bytes())))
    return out


def flip_byte(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------- basics


def test_layout_put_get_open(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = obj(b"hello world\n")
    assert cache.get_path(digest) is None and not cache.contains(digest)
    path = cache.put_bytes(digest, content)
    # upstream layout: <xx>/<rest of hex>, no type suffix; txn/ and quarantaine/ exist
    assert path == tmp_path / digest.hex[:2] / digest.hex[2:]
    assert (tmp_path / "txn").is_dir() and (tmp_path / "quarantaine").is_dir()
    assert len([p for p in tmp_path.iterdir() if len(p.name) == 2]) == 256
    assert cache.get_path(digest) == path and cache.contains(digest)
    handle = cache.open(digest)
    assert handle is not None
    with handle:
        assert handle.read() == content
    db = sqlite3.connect(tmp_path / "cachedb")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute("SELECT size, checksum FROM cache_catalog WHERE sha1 = ?", (digest.hex,))
    assert row.fetchone() == (len(content), zlib.crc32(content))
    assert crc32(content, 0) == zlib.crc32(content)
    usage = cache.usage()
    assert (usage.size_bytes, usage.entries, usage.quota_bytes) == (len(content), 1, None)


def test_put_stream_commits_atomically(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = obj(os.urandom(3 * 2**20))
    final = cache.path_of(digest)
    with cache.put_stream(digest) as txn:
        for start in range(0, len(content), 2**20):
            txn.write(content[start : start + 2**20])
            assert not final.exists() and cache.get_path(digest) is None
        assert txn.path.parent == tmp_path / "txn" and txn.path.exists()
    assert txn.committed_path == final
    assert final.read_bytes() == content
    assert not any((tmp_path / "txn").iterdir())
    assert cache.get_path(digest) == final


def test_put_stream_discards_on_exception(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = obj(b"partial" * 1000)
    with pytest.raises(RuntimeError), cache.put_stream(digest) as txn:
        txn.write(content[:100])
        raise RuntimeError("download failed")
    assert not cache.path_of(digest).exists()
    assert not cache.contains(digest)
    assert not any((tmp_path / "txn").iterdir())
    assert cache.usage().entries == 0


@pytest.mark.parametrize("removed", ["the whole cache", "txn and object folders"])
def test_folders_removed_under_a_live_cache_are_made_again(tmp_path: Path, removed: str) -> None:
    """A temporary-file cleaner, or ``rm -rf`` of the cache under a running mount: before,
    every later put failed (``txn/...tmp: No such file or directory``), so every read of a
    file not yet cached gave EIO until the mount was restarted."""
    import shutil

    cache = ObjectCache(tmp_path / "c")
    first, data = numbered(1, 100_000)
    cache.put_bytes(first, data)
    if removed == "the whole cache":
        shutil.rmtree(tmp_path / "c")
    else:
        shutil.rmtree(cache.txn_dir)
        for folder in (tmp_path / "c").glob("[0-9a-f][0-9a-f]"):
            shutil.rmtree(folder)
    assert cache.get_path(first) is None  # gone: a miss, fetched again by the caller
    for digest, content in (numbered(2, 100_000), (first, data)):
        with cache.put_stream(digest) as txn:
            txn.write(content)
        path = cache.get_path(digest)
        assert path is not None and path.read_bytes() == content
    cache.close()


def test_put_stream_rewind_and_rewrite_keeps_a_correct_checksum(tmp_path: Path) -> None:
    """What Fetcher.fetch_into does on a retry: seek back, truncate, write again."""
    cache = ObjectCache(tmp_path)
    digest, content = obj(b"abcdefgh" * 5000)
    with cache.put_stream(digest) as txn:
        txn.write(b"garbage" * 100)
        txn.seek(0)
        txn.truncate()
        txn.write(content[:1000])
        txn.seek(10)
        txn.write(content[10:20])  # an overwrite in the middle: checksum recomputed at commit
        txn.seek(0, os.SEEK_END)
        txn.write(content[1000:])
    assert cache.verify(digest, len(content))
    assert cache.get_path(digest) is not None


def test_crash_mid_write_leaves_only_a_txn_file_cleaned_at_next_start(tmp_path: Path) -> None:
    ObjectCache(tmp_path)
    digest, content = obj(b"crash" * 10000)

    def writer() -> None:
        cache = ObjectCache(tmp_path)
        with cache.put_stream(digest) as txn:
            txn.write(content[:20000])
            txn.flush()
            os._exit(3)  # killed mid-download

    child = FORK.Process(target=writer)
    child.start()
    child.join()
    assert child.exitcode == 3
    leftovers = list((tmp_path / "txn").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f"{child.pid}.")
    assert not ObjectCache(tmp_path).contains(digest)  # a new instance cleans it up
    assert not any((tmp_path / "txn").iterdir())
    mine = tmp_path / "txn" / f"{os.getpid()}.inprogress.tmp"
    mine.write_bytes(b"x")
    ObjectCache(tmp_path)
    assert mine.exists()  # a live writer's file is left alone


# ---------------------------------------------------------------- quota, LRU, pins


def test_quota_evicts_lru_down_to_half(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, quota_bytes=10_000)
    items = [numbered(i, 1500) for i in range(10)]
    for digest, content in items[:6]:
        cache.put_bytes(digest, content)
    assert cache.usage().size_bytes == 9000
    assert cache.get_path(items[0][0]) is not None  # touch: now most recently used
    cache.put_bytes(*items[6])  # 10_500 > quota: evict down to 5000
    present = [i for i, (d, _) in enumerate(items) if cache.contains(d)]
    assert present == [0, 5, 6]
    assert cache.usage().size_bytes == 4500
    files = [p for d in tmp_path.iterdir() if len(d.name) == 2 for p in d.iterdir()]
    assert sorted(p.stat().st_size for p in files) == [1500, 1500, 1500]
    for digest, content in items[7:]:
        cache.put_bytes(digest, content)
    assert cache.usage().size_bytes <= 10_000
    for digest, content in items:
        path = cache.get_path(digest)
        assert path is None or path.read_bytes() == content


def test_pinned_entries_survive_eviction(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, quota_bytes=10_000)
    catalog, catalog_bytes = numbered(100, 2000)
    cache.put_bytes(catalog, catalog_bytes, pin=True)
    other, other_bytes = numbered(101, 1000)
    cache.put_bytes(other, other_bytes)
    cache.pin(other)
    for i in range(20):
        cache.put_bytes(*numbered(i, 1500))
    assert cache.get_path(catalog) is not None and cache.get_path(other) is not None
    assert cache.is_pinned(catalog)
    assert cache.usage().pinned_bytes == 3000
    before = cache.usage().size_bytes
    assert cache.evict_to(0) == before - 3000
    assert cache.usage().size_bytes == 3000  # only the pinned ones are left
    cache.unpin(other)
    assert cache.evict_to(0) == 1000 and not cache.contains(other)
    cache.unpin(catalog)
    assert cache.evict_to(0) == 2000 and cache.usage().entries == 0


def test_pins_are_counted(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = numbered(1, 100)
    cache.put_bytes(digest, content)
    cache.pin(digest)
    cache.pin(digest)
    cache.unpin(digest)
    assert cache.evict_to(0) == 0 and cache.contains(digest)
    cache.unpin(digest)
    assert cache.evict_to(0) == 100 and not cache.contains(digest)


def test_pins_of_a_dead_process_do_not_block_eviction(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = numbered(7, 500)
    cache.put_bytes(digest, content)

    def pinner() -> None:
        ObjectCache(tmp_path).pin(digest)
        os._exit(0)  # dies without unpinning

    child = FORK.Process(target=pinner)
    child.start()
    child.join()
    assert child.exitcode == 0
    assert not cache.is_pinned(digest)
    assert cache.evict_to(0) == 500


def test_object_larger_than_the_quota_is_refused(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, quota_bytes=1000)
    digest, content = numbered(1, 2000)
    with pytest.raises(ConfigError, match="CVMFS_QUOTA_LIMIT"):
        cache.put_bytes(digest, content)
    assert not cache.contains(digest) and not any((tmp_path / "txn").iterdir())
    with pytest.raises(ConfigError), cache.put_stream(digest) as txn:
        txn.write(content)
    assert not cache.path_of(digest).exists()


def test_an_object_over_half_the_quota_evicts_the_rest_but_stays(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, quota_bytes=1000)
    small, small_bytes = numbered(1, 300)
    cache.put_bytes(small, small_bytes)
    big, big_bytes = numbered(2, 800)
    cache.put_bytes(big, big_bytes)
    assert cache.contains(big) and not cache.contains(small)
    assert cache.usage().size_bytes == 800


# ---------------------------------------------------------------- corruption


def test_corrupted_file_is_detected_quarantined_and_refetchable(tmp_path: Path) -> None:
    digest, content = obj(os.urandom(5000))
    ObjectCache(tmp_path).put_bytes(digest, content)
    path = tmp_path / digest.hex[:2] / digest.hex[2:]
    flip_byte(path, 1234)
    cache = ObjectCache(tmp_path)  # e.g. the next process
    assert cache.get_path(digest) is None
    assert cache.open(digest) is None
    assert not path.exists()
    quarantined = list((tmp_path / "quarantaine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(digest.hex)
    usage = cache.usage()
    assert (usage.entries, usage.size_bytes, usage.quarantined) == (0, 0, 1)
    cache.put_bytes(digest, content)  # the caller's refetch repairs it
    repaired = cache.get_path(digest)
    assert repaired is not None and repaired.read_bytes() == content


def test_two_readers_of_one_corrupt_copy_keep_the_fresh_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reader B finds the copy corrupt; before B moves it aside, reader A has already done so
    and stored a fresh copy (a job and the prefetcher, in CI). B must leave the fresh one."""
    import cvmfs_ml.client.cache as cache_module

    digest, content = obj(os.urandom(5000))
    ObjectCache(tmp_path).put_bytes(digest, content)
    flip_byte(tmp_path / digest.hex[:2] / digest.hex[2:], 99)
    reader_a, reader_b = ObjectCache(tmp_path), ObjectCache(tmp_path)
    real_crc = cache_module.crc_of_file

    def crc_then_a_repairs(path: Path) -> int:
        found = real_crc(path)  # B's check reads the corrupt bytes ...
        monkeypatch.setattr(cache_module, "crc_of_file", real_crc)
        assert reader_a.get_path(digest) is None  # ... then A quarantines and refetches
        reader_a.put_bytes(digest, content)
        return found

    monkeypatch.setattr(cache_module, "crc_of_file", crc_then_a_repairs)
    assert reader_b.get_path(digest) is None  # B saw corruption: its caller refetches
    assert reader_b.usage().quarantined == 1  # one corrupt copy, moved aside once
    fresh = reader_a.get_path(digest)
    assert fresh is not None and fresh.read_bytes() == content


def test_truncated_or_missing_file_is_detected(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    cut, cut_bytes = numbered(1, 4000)
    gone, gone_bytes = numbered(2, 4000)
    cache.put_bytes(cut, cut_bytes)
    cache.put_bytes(gone, gone_bytes)
    os.truncate(cache.path_of(cut), 1000)
    os.unlink(cache.path_of(gone))
    assert cache.get_path(cut) is None and cache.get_path(gone) is None
    assert cache.usage().size_bytes == 0
    assert len(list((tmp_path / "quarantaine").iterdir())) == 1


def test_small_files_are_checked_on_every_lookup(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = obj(os.urandom(10_000))
    path = cache.put_bytes(digest, content)
    assert cache.get_path(digest) == path
    flip_byte(path, 5, keep_mtime=True)  # same inode, size and mtime
    assert cache.get_path(digest) is None


def test_large_files_are_checked_once_per_process_verify_checks_now(tmp_path: Path) -> None:
    """The documented trade-off: in-place damage after the first check needs verify()."""
    cache = ObjectCache(tmp_path)
    digest, content = obj(os.urandom(ALWAYS_VERIFY_BYTES + 4096))
    path = cache.put_bytes(digest, content)
    assert cache.get_path(digest) == path
    flip_byte(path, 100, keep_mtime=True)
    assert cache.get_path(digest) == path  # not re-read in this process
    assert ObjectCache(tmp_path).get_path(digest) is None  # a new process catches it


def test_verify_checks_the_catalog_size(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = numbered(3, 4000)
    cache.put_bytes(digest, content)
    assert cache.verify(digest, 4000)
    assert not cache.verify(digest, 4001)  # the catalog disagrees: quarantined
    assert not cache.contains(digest)
    assert not cache.verify(digest)


def test_invalidate_quarantines(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = numbered(4, 4000)
    cache.put_bytes(digest, content)
    cache.invalidate(digest)
    assert cache.get_path(digest) is None
    assert cache.usage().quarantined == 1
    cache.invalidate(digest)  # idempotent


def test_quarantine_is_bounded(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    for i in range(30):
        digest, content = numbered(i, 40)
        cache.put_bytes(digest, content)
        cache.invalidate(digest)
    assert cache.usage().quarantined == 16


# ---------------------------------------------------------------- upkeep


def test_wipe_and_fsck(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    items = [numbered(i, 100) for i in range(5)]
    for digest, content in items:
        cache.put_bytes(digest, content)
    stray = tmp_path / "ab" / ("c" * 38)
    stray.write_bytes(b"orphan")
    os.unlink(cache.path_of(items[0][0]))
    assert cache.fsck() == (1, 1)
    assert not stray.exists() and cache.usage().entries == 4
    assert cache.usage().size_bytes == 400
    cache.pin(items[1][0])
    cache.wipe()
    usage = cache.usage()
    assert (usage.entries, usage.size_bytes, usage.pinned_bytes) == (0, 0, 0)
    assert not any(p for d in tmp_path.iterdir() if len(d.name) == 2 for p in d.iterdir())


def test_refuses_upstream_cache_folder(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "cachedb")
    db.execute(
        "CREATE TABLE cache_catalog (sha1 TEXT, size INTEGER, acseq INTEGER, path TEXT, "
        "type INTEGER, pinned INTEGER, CONSTRAINT pk_cache_catalog PRIMARY KEY (sha1))"
    )
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="upstream"):
        ObjectCache(tmp_path)


def test_invalid_quota(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CVMFS_QUOTA_LIMIT"):
        ObjectCache(tmp_path, quota_bytes=0)


# ---------------------------------------------------------------- concurrency


def test_threads_share_one_instance(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, quota_bytes=200_000)
    items = [numbered(i, 3000) for i in range(100)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for k in range(60):
                digest, content = items[(seed * 7 + k) % len(items)]
                handle = cache.open(digest)
                if handle is None:
                    cache.put_bytes(digest, content)
                    continue
                with handle:  # stays readable even if evicted right now
                    assert handle.read() == content
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.usage().size_bytes <= 200_000
    assert cache.fsck() == (0, 0)


def _fill(root: str, reverse: bool, barrier: object, quota: int | None) -> None:
    """One process filling the shared cache with every reference object."""
    cache = ObjectCache(Path(root), quota)
    items = reference_objects()
    if reverse:
        items.reverse()
    barrier.wait()  # type: ignore[attr-defined]
    for _round in range(2):
        for digest, content in items:
            if cache.get_path(digest) is not None:
                continue
            if len(content) > 2**20:
                with cache.put_stream(digest) as txn:
                    for start in range(0, len(content), 2**20):
                        txn.write(content[start : start + 2**20])
            else:
                cache.put_bytes(digest, content)
    cache.close()


@pytest.mark.parametrize("quota", [None, 12 * 2**20])
def test_two_processes_fill_the_same_cache(tmp_path: Path, quota: int | None) -> None:
    barrier = FORK.Barrier(3)
    workers = [
        FORK.Process(target=_fill, args=(str(tmp_path), reverse, barrier, quota))
        for reverse in (False, True)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    cache = ObjectCache(tmp_path, quota)
    expected = dict(reference_objects())
    present = 0
    for digest, content in expected.items():
        path = cache.get_path(digest)
        if quota is None:
            assert path is not None
        if path is not None:
            assert path.read_bytes() == content
            present += 1
    usage = cache.usage()
    assert usage.entries == present
    assert usage.size_bytes == sum(len(expected[d]) for d in expected if cache.contains(d))
    if quota is None:
        assert usage.size_bytes == sum(len(c) for c in expected.values())
    else:
        assert usage.size_bytes <= quota
    assert not any((tmp_path / "txn").iterdir())
    assert usage.quarantined == 0
    assert cache.fsck() == (0, 0)


def test_instance_inherited_across_fork_reconnects(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    parent_digest, parent_bytes = numbered(1, 1000)
    cache.put_bytes(parent_digest, parent_bytes)
    child_digest, child_bytes = numbered(2, 1000)

    def child() -> None:
        ok = cache.get_path(parent_digest) is not None
        cache.put_bytes(child_digest, child_bytes)
        os._exit(0 if ok else 1)

    process = FORK.Process(target=child)
    process.start()
    process.join()
    assert process.exitcode == 0
    path = cache.get_path(child_digest)
    assert path is not None and path.read_bytes() == child_bytes
    assert cache.usage().entries == 2


def test_concurrent_puts_of_one_object_from_threads(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path)
    digest, content = obj(os.urandom(2 * 2**20))

    def put(_: int) -> Path:
        with cache.put_stream(digest) as txn:
            txn.write(content)
        return cache.path_of(digest)

    with ThreadPoolExecutor(6) as pool:
        paths = set(pool.map(put, range(12)))
    assert paths == {cache.path_of(digest)}
    assert cache.get_path(digest) is not None
    assert cache.path_of(digest).read_bytes() == content
    assert cache.usage().size_bytes == len(content) and cache.usage().entries == 1


def _open_and_put(root: str, barrier: object, index: int) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    with ObjectCache(root) as cache:
        digest, content = numbered(100 + index, 50_000)
        cache.put_bytes(digest, content)
        assert cache.get_path(digest) is not None


def test_a_damaged_cachedb_is_set_aside_once_and_the_cache_starts_empty(tmp_path: Path) -> None:
    """Before, ``DatabaseError: file is not a database`` stopped every mount and reader of the
    cache until someone removed the file by hand."""
    cache = ObjectCache(tmp_path)
    old, content = numbered(1, 100_000)
    cache.put_bytes(old, content)
    cache.close()
    (tmp_path / "cachedb").write_bytes(b"not a database, a disk error" * 200)
    (tmp_path / "cachedb-wal").unlink(missing_ok=True)
    barrier = FORK.Barrier(3)  # three processes meet it at once
    workers = [FORK.Process(target=_open_and_put, args=(str(tmp_path), barrier, i)) for i in (1, 2)]
    for worker in workers:
        worker.start()
    barrier.wait()
    _open_and_put(str(tmp_path), FORK.Barrier(1), 3)
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(list(tmp_path.glob("cachedb.damaged.*[0-9]"))) == 1  # moved aside once
    with ObjectCache(tmp_path) as cache:
        assert cache.get_path(old) is None and not cache.path_of(old).exists()  # not trusted
        assert cache.usage().entries == 3  # what the three processes put, all kept
