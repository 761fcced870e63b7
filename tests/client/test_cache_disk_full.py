"""A client cache whose disk fills up before its quota does (CVMFS_QUOTA_LIMIT is 4000 MB by
default; job nodes often give the cache a smaller partition, or other files fill it).

Before, every object not yet cached then failed with ENOSPC for as long as the mount lived,
with nothing in its log: the mount kept only what it had cached. Now the cache evicts least
recently used entries and the fetch is tried again, large files are read ahead within what the
disk holds, and a disk that other files fill is one clear error until there is room again.
Real tmpfs disks of a few MiB, a real FUSE mount and the real CLI.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.locate import open_target
from cvmfs_ml.client.mounts import MountHandle
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.errors import CacheFullError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from disks import fill, small_tmpfs

FQRN = "cachefull.test"
MiB = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """(repository folder, master key, files): 136 MB, twice what the 64 MiB cache disk holds."""
    base = tmp_path_factory.mktemp("cachefull")
    publisher = create_repository(
        base / "srv", FQRN, settings=PublishSettings(compression="none", workers=2)
    )
    files = {f"/small/f{i}.bin": os.urandom(8 * MiB) for i in range(4)}
    files["/big.bin"] = os.urandom(104 * MiB)  # chunked: many pieces, read ahead in parallel
    with publisher.transaction() as txn:
        for path, data in files.items():
            txn.add_bytes(path, data)
        txn.commit()
    return publisher.repo_dir, publisher.keys.paths.master_public, files


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_mount_keeps_serving_when_its_cache_disk_fills_before_the_quota(
    mounter: Callable[..., MountHandle],
    repo: tuple[Path, Path, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    folder, key, files = repo
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        log = tmp_path / "daemon.log"
        handle = mounter(folder, public_key=key, cache=disk / "cache", log_file=log)
        for _round in range(2):  # the second round needs what the first evicted again
            for path, data in files.items():
                got = (handle.mountpoint / path.lstrip("/")).read_bytes()
                assert digest(got) == digest(data), path
        text = log.read_text()
        assert "the disk filled up" in text and "CVMFS_QUOTA_LIMIT" in text, text
        assert "ERROR" not in text, text
        assert handle.process is not None and handle.process.poll() is None


def test_a_disk_full_of_other_files_is_one_clear_error_until_there_is_room(
    repo: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    folder, key, files = repo
    data = files["/small/f0.bin"]
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        with open_target(str(folder), public_key=key, cache=disk / "cache") as repository:
            fill(disk / "logs", leave=2 * MiB)  # someone else's files
            with pytest.raises(CacheFullError, match=r"cache disk .* no room .*free space on it"):
                repository.read_bytes("/small/f0.bin")
            (disk / "logs").unlink()
            assert digest(repository.read_bytes("/small/f0.bin")) == digest(data)

        # The command line says the same in one line: browsing caches in a temporary folder.
        (disk / "tmp").mkdir()
        fill(disk / "logs", leave=2 * MiB)
        result = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml", "repo", "cat", str(folder), "/small/f1.bin",
             "--key", str(key)],
            capture_output=True, timeout=120, env={**os.environ, "TMPDIR": str(disk / "tmp")},
        )  # fmt: skip
        stderr = result.stderr.decode()
        lines = stderr.strip().splitlines()
        assert result.returncode == 1 and not result.stdout, stderr
        assert len(lines) == 1 and "cache disk" in lines[0] and "free space" in lines[0], stderr


def test_make_room_evicts_the_least_recently_used_and_capacity_follows_the_disk(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "disk", "24m") as disk:
        cache = ObjectCache(disk / "cache", quota_bytes=4000 * MiB)
        assert cache.capacity_bytes() < 24 * MiB  # the disk, not the 4000 MB quota
        blobs = [os.urandom(4 * MiB) for _ in range(5)]
        names: list[Digest] = [hash_bytes(blob) for blob in blobs]
        for name, blob in zip(names, blobs, strict=True):
            cache.put_bytes(name, blob)
        cache.get_path(names[0])  # used again: the newest in LRU order
        cache.close()  # writes the LRU update
        cache = ObjectCache(disk / "cache", quota_bytes=4000 * MiB)
        freed = cache.make_room(6 * MiB)
        assert freed >= 4 * MiB
        kept = [cache.contains(name) for name in names]
        assert kept[0] and not kept[1], kept  # least recently used first
        fs = os.statvfs(disk)
        assert fs.f_bavail * fs.f_frsize >= 6 * MiB
        assert cache.usage().size_bytes == sum(
            len(blob) for blob, keep in zip(blobs, kept, strict=True) if keep
        )
        fill(disk / "other", leave=0)
        with pytest.raises(CacheFullError):
            cache.make_room(64 * MiB)  # more than the disk could ever give
        cache.close()


def test_warming_more_than_the_cache_can_hold_is_refused_up_front(
    repo: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Before, ``warm`` fetched pieces until the disk was full, evicting its own first pieces
    for its last (every byte fetched for nothing), and ended on the disk-full error."""
    from cvmfs_ml.client.prefetch import warm
    from cvmfs_ml.errors import ConfigError

    folder, key, files = repo
    with (
        small_tmpfs(tmp_path / "disk", "48m") as disk,
        open_target(str(folder), public_key=key, cache=disk / "cache") as repository,
    ):
        with pytest.raises(ConfigError, match=r"warming 5 file\(s\) of 136 MiB needs more"):
            warm(repository, "/")
        assert not any((disk / "cache" / "txn").iterdir())
        done = warm(repository, "/small")  # what fits is warmed
        assert (done.files, done.bytes) == (4, 32 * MiB)
        assert repository.read_bytes("/small/f3.bin") == files["/small/f3.bin"]


def test_fsspec_reads_a_file_larger_than_its_cache_disk(
    repo: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """fsspec, like the mount, closes the pieces it leaves behind in a file larger than the
    cache keeps. Before, it kept them open: evicted, they held their blocks, and reading the
    104 MB file through a 48 or 64 MiB cache disk failed with CacheFullError."""
    import fsspec

    folder, key, files = repo
    with small_tmpfs(tmp_path / "disk", "48m") as disk:
        fs = fsspec.filesystem(
            "cvmfs", server_url=str(folder), public_key=str(key),
            cache_storage=str(disk / "cache"), skip_instance_cache=True,
        )  # fmt: skip
        got = hashlib.sha256()
        with fs.open(f"{FQRN}/big.bin", "rb") as handle:
            while block := handle.read(4 * MiB):
                got.update(block)
        assert got.hexdigest() == digest(files["/big.bin"])


def test_a_disk_too_full_to_record_an_eviction_is_the_cache_full_error(tmp_path: Path) -> None:
    """Evicted files that are still open keep their blocks, so the eviction's own database
    write can find no room (a reader holding its pieces, as above). That surfaced as SQLite's
    "database or disk is full", which no caller maps; it is the CacheFullError now."""
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        cache = ObjectCache(disk / "cache", quota_bytes=4000 * MiB)
        blobs = [os.urandom(2 * MiB) for _ in range(3)]
        held = []
        for blob in blobs:
            name = hash_bytes(blob)
            cache.put_bytes(name, blob)
            held.append(open(cache.path_of(name), "rb"))  # noqa: SIM115 - a reader's pieces
        with sqlite3.connect(disk / "cache" / "cachedb") as db:  # the journal holds no room
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fill(disk / "other", leave=0)
        try:
            with pytest.raises(CacheFullError, match=r"cache disk .*free space on it"):
                cache.make_room(4 * MiB)
        finally:
            for handle in held:
                handle.close()
        (disk / "other").unlink()
        cache.close()


def test_reads_of_what_is_cached_go_on_when_the_lru_order_cannot_be_written(
    tmp_path: Path,
) -> None:
    """The LRU order is written in batches on lookups; on a disk with no room left that write
    failed, and with it the read of an object that was right there in the cache."""
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        cache = ObjectCache(disk / "cache", quota_bytes=4000 * MiB)
        blobs = [os.urandom(1024) + bytes([i]) for i in range(100)]
        names = [hash_bytes(blob) for blob in blobs]
        for name, blob in zip(names, blobs, strict=True):
            cache.put_bytes(name, blob)
        with sqlite3.connect(disk / "cache" / "cachedb") as db:  # the journal holds no room
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fill(disk / "other", leave=0)
        for name, blob in zip(names, blobs, strict=True):  # past one batch of LRU updates
            path = cache.get_path(name)
            assert path is not None and path.read_bytes() == blob
        cache.close()
        (disk / "other").unlink()
        cache = ObjectCache(disk / "cache", quota_bytes=4000 * MiB)
        assert all(cache.contains(name) for name in names)
        cache.close()
