"""Warm reads (issue 14): disk read-ahead of cached pieces, page-cache-only reads on the FUSE
loop, caches stamped after a full check, and corruption still caught with all of it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_ml.bench.residency import resident_fraction
from cvmfs_ml.client.cache import ALWAYS_VERIFY_BYTES, ObjectCache
from cvmfs_ml.client.fuse import MountHandle
from cvmfs_ml.client.readprofile import READ_PROFILE
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.hashing import Algorithm, Digest
from waiting import wait_until

REF = "ref.test.local"
BIG = "/big/random-24MiB.bin"


@pytest.fixture
def repo(reference_repo: Path, tmp_path: Path) -> Iterator[Repository]:
    with Repository.open(
        reference_repo / "cvmfs" / REF,
        public_key=reference_repo / "keys" / f"{REF}.pub",
        cache=tmp_path / "cache",
    ) as opened:
        yield opened


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # DONTNEED keeps dirty pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_sequential_reader_gets_the_next_cached_pieces_opened_and_advised(
    repo: Repository,
) -> None:
    expected = repo.read_bytes(BIG)  # fills the cache
    layout = repo.layout(BIG)
    assert len(layout.pieces) >= 3
    before = READ_PROFILE.snapshot()["advise_pieces"]
    with repo.open_file(BIG, prefetch=False) as handle:
        handle.disk_ahead_bytes = layout.pieces[1].size + layout.pieces[2].size
        buffer = bytearray(4096)
        assert handle.pread_into(buffer, 0) == 4096
        assert bytes(buffer) == expected[:4096]
        # pieces 1 and 2 are opened by the disk read-ahead, not by a read
        wait_until(lambda: handle.is_open(10, layout.pieces[2].offset), 60, "piece 2 opened")
        # each piece is counted once paged in, after it was opened: wait for the count too
        wait_until(lambda: READ_PROFILE.snapshot()["advise_pieces"] >= before + 3, 60,
                   lambda: f"advised: {READ_PROFILE.snapshot()['advise_pieces'] - before}")
        last = layout.pieces[-1]
        assert not handle.is_open(10, last.offset) or len(layout.pieces) <= 3
        # an open piece is then served without a lookup: the nowait read gives the bytes
        start = layout.pieces[2].offset - 100
        wait_until(lambda: handle.pread_nowait(buffer, start) is not None, 60, "a nowait read")
        assert bytes(buffer) == expected[start : start + 4096]


def test_a_random_reader_gets_no_disk_read_ahead(repo: Repository) -> None:
    repo.read_bytes(BIG)
    layout = repo.layout(BIG)
    with repo.open_file(BIG, prefetch=False) as handle:
        handle.disk_ahead_bytes = 1 << 30
        handle.pread(10, layout.pieces[-1].offset)  # a jump: not a sequential start
        assert not handle.is_open(10, 0)
        assert handle._advised == -1


def test_nowait_reads_only_what_the_page_cache_holds(repo: Repository) -> None:
    expected = repo.read_bytes(BIG)
    layout = repo.layout(BIG)
    piece = layout.pieces[1]
    cache_file = repo.cache.path_of(piece.digest)
    with repo.open_file(BIG, prefetch=False) as handle:
        handle.disk_ahead_bytes = 0  # nothing may bring the pages back behind the test's back
        buffer = bytearray(65536)
        start = piece.offset + piece.size // 2  # inside piece 1, beyond the kernel's read-ahead
        assert start + len(buffer) <= piece.offset + piece.size
        assert handle.pread_nowait(buffer, piece.offset) is None  # not open: no lookup here
        assert handle.pread_into(buffer, piece.offset) == len(buffer)
        assert handle.is_open(len(buffer), start)
        _drop_page_cache(cache_file)
        if resident_fraction(cache_file) == 0.0:  # a file system that keeps pages (tmpfs) won't
            assert handle.pread_nowait(buffer, start) is None  # would wait for the disk
        assert handle.pread_into(buffer, start) == len(buffer)
        assert bytes(buffer) == expected[start : start + len(buffer)]
        buffer[:] = bytes(len(buffer))
        assert handle.pread_nowait(buffer, start) == len(buffer)  # now in the page cache
        assert bytes(buffer) == expected[start : start + len(buffer)]
        assert handle.pread_nowait(buffer, len(expected) + 1) == 0  # past the end


def _obj(content: bytes) -> tuple[Digest, bytes]:
    return Digest(Algorithm.SHA1, hashlib.sha1(content).digest()), content


def _unstamp(root: Path) -> None:
    """Make every entry look like one written before stamps existed."""
    import sqlite3

    with sqlite3.connect(root / "cachedb") as db:
        db.execute("UPDATE cache_catalog SET stamp = NULL")


def test_an_unstamped_cache_is_checked_once_then_stamped(tmp_path: Path) -> None:
    digest, content = _obj(os.urandom(ALWAYS_VERIFY_BYTES * 4))
    path = ObjectCache(tmp_path).put_bytes(digest, content)
    _unstamp(tmp_path)
    crcs = READ_PROFILE.snapshot()["crc_files"]
    assert ObjectCache(tmp_path).get_path(digest) == path  # checked in full, then stamped
    assert READ_PROFILE.snapshot()["crc_files"] == crcs + 1
    assert ObjectCache(tmp_path).get_path(digest) == path  # the next process trusts the stamp
    assert READ_PROFILE.snapshot()["crc_files"] == crcs + 1
    # damage after the stamp moves the ctime: the next process checks and quarantines
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert ObjectCache(tmp_path).get_path(digest) is None
    assert any((tmp_path / "quarantaine").iterdir())


def test_a_corrupt_unstamped_file_is_never_stamped(tmp_path: Path) -> None:
    digest, content = _obj(os.urandom(ALWAYS_VERIFY_BYTES * 2))
    path = ObjectCache(tmp_path).put_bytes(digest, content)
    _unstamp(tmp_path)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    assert ObjectCache(tmp_path).get_path(digest) is None
    assert not ObjectCache(tmp_path).contains(digest)


# -- through a mount --------------------------------------------------------------------------
@pytest.mark.service
def test_warm_mount_serves_right_bytes_and_refetches_a_damaged_piece(
    mounter: Callable[..., MountHandle], reference_repo: Path, tmp_path: Path
) -> None:
    """Warm: cache full, page cache dropped. A piece damaged in the cache meanwhile is found
    (its ctime moved, so the CRC is checked), quarantined and fetched again: the reader gets
    the right bytes, never the damaged ones. The read profile shows where reads were served."""
    key = reference_repo / "keys" / f"{REF}.pub"
    source = reference_repo / "cvmfs" / REF
    cache = tmp_path / "shared-cache"
    with Repository.open(source, public_key=key, cache=cache) as repo:
        expected = repo.read_bytes(BIG)
        layout = repo.layout(BIG)
    damaged = ObjectCache(cache).path_of(layout.pieces[2].digest)
    with open(damaged, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    for entry in cache.glob("??/*"):
        _drop_page_cache(entry)
    handle = mounter(source, public_key=key, cache=cache)
    target = handle.mountpoint / BIG.lstrip("/")
    got = hashlib.sha256()
    with open(target, "rb") as f:
        while block := f.read(1 << 20):
            got.update(block)
    assert got.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert any((cache / "quarantaine").iterdir())
    stats = json.loads(os.getxattr(handle.mountpoint, "user.cvmfs_ml.stats"))
    profile = stats["read_profile"]
    assert profile["loop_reads"] + profile["thread_reads"] >= len(expected) // (1 << 20)
    assert profile["loop_bytes"] + profile["thread_bytes"] >= len(expected)
    assert profile["loop_cpu_seconds"] > 0
