"""Writing around the page cache: early writeback, drop-behind, and O_DIRECT with fallbacks.

Every test checks the bytes that come out; residency is checked where the file system can
show it (tmpfs keeps written pages in memory, whatever is asked).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import random
import sys
from pathlib import Path

import pytest

from cvmfs_ml.bench.residency import drops_written_pages, resident_fraction
from cvmfs_ml.storage import local, pagecache
from cvmfs_ml.storage.local import LocalStore
from cvmfs_ml.storage.pagecache import (
    DropBehind,
    UncachedWriter,
    write_parts_direct,
)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "repo")
    store.create_skeleton()
    return store


def takes_o_direct(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        (folder / "direct-probe").unlink(missing_ok=True)
    return True


def test_sync_file_range_is_found_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert pagecache._SYNC_FILE_RANGE is not None


def test_buffered_large_objects_start_writeback_small_and_durable_ones_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "repo", direct_writes=False)
    store.create_skeleton()
    started: list[int] = []
    real = local.start_writeback

    def recording(fd: int) -> None:
        started.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(local, "start_writeback", recording)
    big = os.urandom(local.WRITEBACK_FROM + 1)
    half = len(big) // 2
    store.put_parts("data/ab/big", [memoryview(big)[:half], memoryview(big)[half:]])
    store.put_parts("data/ab/small", [b"x" * 100])
    store.put_parts("data/ab/durable", [big], durable=True)  # fsynced instead
    assert started == [len(big)]
    assert store.get_bytes("data/ab/big") == big
    assert store.get_bytes("data/ab/durable") == big
    assert not any((store.root / "data" / "txn").iterdir())  # no temporary file left
    store.flush()  # the durability point a publish relies on still works


@pytest.mark.parametrize("size", [2**20, 2**20 + 1, 8 * 2**20, 8 * 2**20 + 4097, 19 * 2**20 - 3])
def test_large_objects_are_written_around_the_page_cache(store: LocalStore, size: int) -> None:
    data = os.urandom(size)
    cut = [0, 5, size // 3, size // 3 + 1, size]  # parts of odd lengths and offsets
    parts = [memoryview(data)[a:b] for a, b in itertools.pairwise(cut)]
    store.put_parts("data/cd/big", parts)
    store.put_parts("data/cd/small", [data[:1000]])
    store.put_parts("data/cd/durable", [data], durable=True)
    path = store.path("data/cd/big")
    assert path.stat().st_size == size  # the padded last block was cut off
    if drops_written_pages(store.root):
        assert resident_fraction(path) == 0.0
        assert resident_fraction(store.path("data/cd/small")) == 1.0  # small: cached as before
    assert path.read_bytes() == data
    assert store.get_bytes("data/cd/small") == data[:1000]
    assert store.get_bytes("data/cd/durable") == data
    assert store.direct_writes == takes_o_direct(store.root)  # else remembered: buffered
    assert not any((store.root / "data" / "txn").iterdir())
    store.flush()


def test_write_parts_direct_leaves_the_descriptor_as_it_found_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert write_parts_direct(fd, [b"abc", b"d" * 5000])
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
        os.write(fd, b"!")  # an unaligned write after it: only possible without O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc" + b"d" * 5000 + b"!"


def chunks(data: bytes, seed: int) -> list[memoryview]:
    """``data`` cut at random places, as a socket delivers it."""
    rng, out, at = random.Random(seed), [], 0
    while at < len(data):
        n = rng.choice([1, 7, 4096, 65536, 1 << 20, 3 * 2**20 + 5])
        out.append(memoryview(data)[at : at + n])
        at += n
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 64 * 2**10, 64 * 2**10 + 1, 5 * 2**20 + 13])
def test_uncached_writer_writes_every_byte_in_order(
    tmp_path: Path, size: int, direct: bool
) -> None:
    data = os.urandom(size)
    hasher = hashlib.sha256()
    path = tmp_path / "blob"
    with UncachedWriter(path, block=64 * 2**10, buffers=2, direct=direct, hasher=hasher) as file:
        for piece in chunks(data, size):
            assert file.write(piece) == len(piece)
        assert file.size == size
    assert path.read_bytes() == data
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()  # every byte, in order


@pytest.mark.parametrize("direct", [True, False])
def test_appending_requests_hash_and_write_every_byte_once(tmp_path: Path, direct: bool) -> None:
    """An upload session: each request appends where the last one stopped (any alignment),
    one hasher runs across them, and the file ends exactly at its length after each."""
    data = os.urandom(3 * 2**20 + 12345)
    cuts = [0, 1, 4095, 4097, 70_000, 2**20 + 3, len(data)]
    hasher = hashlib.sha256()
    path = tmp_path / "session"
    path.touch()
    for a, b in itertools.pairwise(cuts):
        with UncachedWriter(path, block=64 * 2**10, direct=direct, append=True, hasher=hasher) as f:
            assert f.size == a
            for piece in chunks(data[a:b], b):
                f.write(piece)
        assert path.stat().st_size == b
        assert hasher.copy().hexdigest() == hashlib.sha256(data[:b]).hexdigest()
    assert path.read_bytes() == data


def test_uncached_writer_keeps_its_file_out_of_the_page_cache(tmp_path: Path) -> None:
    if not (drops_written_pages(tmp_path) and takes_o_direct(tmp_path)):
        pytest.skip("this file system keeps written pages in memory, or refuses O_DIRECT")
    data = os.urandom(16 * 2**20 + 100)
    path = tmp_path / "blob"
    with UncachedWriter(path) as file:
        for piece in chunks(data, 1):
            file.write(piece)
    assert file.direct
    assert resident_fraction(path) == 0.0
    assert path.read_bytes() == data


def test_uncached_writer_raises_the_writer_threads_error(tmp_path: Path) -> None:
    """/dev/full refuses O_DIRECT and fails every write with ENOSPC: the caller sees it."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    file = UncachedWriter("/dev/full", block=4096, buffers=2)
    with pytest.raises(OSError) as failed:
        for _ in range(100):
            file.write(b"x" * 4096)
        file.close()
    assert failed.value.errno == errno.ENOSPC
    file.abort()  # after the error: closes quietly


def test_an_aborted_writer_stops(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    with pytest.raises(RuntimeError), UncachedWriter(path, block=4096, buffers=2) as file:
        file.write(os.urandom(10_000))
        raise RuntimeError("the download failed")
    assert not any(thread.is_alive() for thread in file._threads)


def test_drop_behind_keeps_only_the_last_windows_of_a_written_file(tmp_path: Path) -> None:
    if not drops_written_pages(tmp_path):
        pytest.skip("this file system keeps written pages in memory")
    window, blocks = 1 << 20, 12
    data = os.urandom(window * blocks)
    path = tmp_path / "blob"
    with open(path, "wb", buffering=0) as out:
        behind = DropBehind(out.fileno(), window=window)
        for i in range(blocks):
            out.write(data[i * window : (i + 1) * window])
            behind.wrote((i + 1) * window)
        # everything up to two windows before the end was written back and dropped
        assert resident_fraction(path) <= 2 / blocks + 1e-9
    assert path.read_bytes() == data  # the bytes are all there, read back from the disk


def test_many_writing_threads_keep_few_buffers(store: LocalStore) -> None:
    """A server's thread pools hold dozens of threads: the aligned buffers are shared."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(5 * 2**20 + 3)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.put_parts(f"data/ef/o{i}", [data]), range(48)))
    assert len(pagecache._scratch_pool._free) <= pagecache._SCRATCH_KEPT
    assert all(store.get_bytes(f"data/ef/o{i}") == data for i in range(48))
