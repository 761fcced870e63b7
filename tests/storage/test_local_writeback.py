"""Large objects start their writeback when written; durability still comes from flush()."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cvmfs_ml.storage import local
from cvmfs_ml.storage.local import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "repo")
    store.create_skeleton()
    return store


def test_sync_file_range_is_found_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert local._SYNC_FILE_RANGE is not None


def test_large_objects_start_writeback_small_and_durable_ones_do_not(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_drop_behind_keeps_only_the_last_windows_of_a_written_file(tmp_path: Path) -> None:
    from cvmfs_ml.bench.residency import resident_fraction
    from cvmfs_ml.storage.local import DropBehind, drop_cached_pages

    probe = tmp_path / "probe"  # a file system that keeps pages anyway (tmpfs) proves nothing
    probe.write_bytes(os.urandom(1 << 20))
    if not (drop_cached_pages(probe) and resident_fraction(probe) == 0.0):
        pytest.skip("this file system keeps written pages in memory")
    window, blocks = 1 << 20, 12
    data = os.urandom(window * blocks)
    path = tmp_path / "blob"
    with open(path, "wb", buffering=0) as out:
        behind = DropBehind(out.fileno(), window=window)
        for i in range(blocks):
            out.write(data[i * window:(i + 1) * window])
            behind.wrote((i + 1) * window)
        # everything up to two windows before the end was written back and dropped
        assert resident_fraction(path) <= 2 / blocks + 1e-9
    assert path.read_bytes() == data  # the bytes are all there, read back from the disk
