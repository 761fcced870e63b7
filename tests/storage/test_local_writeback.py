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
