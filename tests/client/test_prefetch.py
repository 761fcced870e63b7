"""Prefetch: parallel and bounded, deduplicated, read-ahead for sequential readers, warm."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.client.prefetch import warm
from cvmfs_ml.client.repository import Repository
from waiting import wait_until

REF = "ref.test.local"
BIG = "/big/random-24MiB.bin"


class CountingStore:
    """The real local store, with a delay per object and a count of fetches in flight.

    ``meet``: the first piece fetches wait (60 s at most) until that many are in flight at once,
    so a pool that runs them in parallel is seen doing so however the machine schedules it
    (catalogs, fetched one at a time by the walk before any piece is queued, do not wait).
    ``gate``: every fetch waits for it to be set (60 s at most).
    """

    def __init__(self, inner: Any, delay: float = 0.0, meet: int = 1) -> None:
        self.inner = inner
        self.delay = delay
        self.meet = meet
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Condition()
        self.active = 0
        self.peak = 0
        self.fetched: list[str] = []

    def fetch(self, rel_path: str, expected: Any, *, compressed: bool, **options: Any) -> bytes:
        return self.inner.fetch(rel_path, expected, compressed=compressed, **options)

    def fetch_into(
        self, rel_path: str, expected: Any, compressed: bool, fileobj: BinaryIO, **options: Any
    ) -> int:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.fetched.append(rel_path)
            self.lock.notify_all()
            if not rel_path.endswith("C"):
                self.lock.wait_for(lambda: self.peak >= self.meet, timeout=60)
        try:
            self.gate.wait(60)
            time.sleep(self.delay)
            return self.inner.fetch_into(rel_path, expected, compressed, fileobj, **options)
        finally:
            with self.lock:
                self.active -= 1

    def path(self, rel_path: str) -> Path:
        return self.inner.path(rel_path)


@pytest.fixture
def repo(reference_repo: Path, tmp_path: Path) -> Iterator[Repository]:
    with Repository.open(
        reference_repo / "cvmfs" / REF,
        public_key=reference_repo / "keys" / f"{REF}.pub",
        cache=tmp_path / "cache",
    ) as opened:
        yield opened


def _cached(repo: Repository, path: str) -> list[bool]:
    return [repo.cache.get_path(p.digest) is not None for p in repo.layout(path).pieces]


def _settle(repo: Repository) -> None:
    wait_until(lambda: repo.prefetcher.pending == 0, 60,
               lambda: f"{repo.prefetcher.pending} prefetches still pending")  # fmt: skip


def test_warm_fetches_in_parallel_within_the_bound(
    repo: Repository, reference_served: Path
) -> None:
    store = CountingStore(repo.source, delay=0.03, meet=3)
    repo.source = store
    layout = repo.layout(BIG)
    result = warm(repo, "/big", parallel=3)
    assert store.peak == 3  # three met (a pool of fewer never would), never more
    assert all(_cached(repo, BIG))
    assert (result.files, result.bytes, result.pieces) == (1, 25165824, len(layout.pieces))
    assert result.fetched == len(layout.pieces) == len(store.fetched)
    stored = sum((reference_served / rel).stat().st_size for rel in store.fetched)
    assert result.net_bytes == stored
    again = warm(repo, "/big", parallel=3)
    assert (again.fetched, again.net_bytes) == (0, 0)
    assert len(store.fetched) == len(layout.pieces)


def test_shared_pool_bounds_concurrency(reference_repo: Path, tmp_path: Path) -> None:
    with Repository.open(
        reference_repo / "cvmfs" / REF, public_key=reference_repo / "keys" / f"{REF}.pub",
        cache=tmp_path / "cache", prefetch_workers=2,
    ) as repo:  # fmt: skip
        store = CountingStore(repo.source, delay=0.02, meet=2)
        repo.source = store
        assert repo.prefetch("/") > 25165824
        assert store.peak == 2  # two met, never more
        assert all(_cached(repo, BIG)) and all(_cached(repo, "/zeros-20MiB.bin"))


def test_repeated_pieces_are_fetched_once(repo: Repository) -> None:
    store = CountingStore(repo.source)
    repo.source = store
    layout = repo.layout("/zeros-20MiB.bin")
    assert len(layout.pieces) == 10 and len({p.digest for p in layout.pieces}) == 1
    store.gate.clear()  # the fetch stays in flight until the second call was made
    futures = repo.prefetch_layout(layout, path="/zeros-20MiB.bin")
    again = repo.prefetch_layout(layout)  # queued already: the same future
    assert len(futures) == 1 and again == futures
    store.gate.set()
    futures[0].result(timeout=60)
    assert len(store.fetched) == 1
    with repo.open_file("/zeros-20MiB.bin", prefetch=False) as handle:
        assert handle.read() == bytes(20 * 2**20)
    assert len(store.fetched) == 1


def test_sequential_reader_gets_read_ahead(repo: Repository) -> None:
    repo.readahead_pieces = 3
    with repo.open_file(BIG, prefetch=False) as handle:
        assert not handle.prefetched
        handle.pread(100, 0)
        _settle(repo)
        assert _cached(repo, BIG)[:6] == [True, True, True, True, False, False]
        second = repo.layout(BIG).pieces[1]
        handle.pread(100, second.offset)  # moved on to the next piece: one more ahead
        _settle(repo)
        assert _cached(repo, BIG)[:6] == [True, True, True, True, True, False]
        far = repo.layout(BIG).pieces[20]
        handle.pread(100, far.offset)  # a jump is not sequential: no read-ahead
        _settle(repo)
        assert _cached(repo, BIG)[20:23] == [True, False, False]


def test_large_files_are_prefetched_when_opened(repo: Repository) -> None:
    repo.prefetch_min_bytes = 2**20
    with repo.open_file(BIG) as handle:
        assert handle.prefetched
        _settle(repo)
        assert all(_cached(repo, BIG))
        assert hashlib.sha256(handle.read()).hexdigest() == (
            "17aeabf536440980563f49a308da60f9cfa4da808fcc0fc0747586d00bab12d3"
        )


def test_concurrent_preads_with_few_open_pieces(repo: Repository) -> None:
    expected = repo.read_bytes(BIG)
    handle = repo.open_file(BIG, prefetch=False)
    handle.max_open_pieces = 2  # forces descriptors to be closed while others read
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            offset = rng.randrange(len(expected))
            size = rng.choice([1, 4096, 2**20, 3 * 2**20])
            if handle.pread(size, offset) != expected[offset : offset + size]:
                errors.append(f"{offset}+{size}")

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.close()
    assert errors == []
    assert len(handle._fds) == 0


def test_file_api_seek_read_and_bounds(repo: Repository) -> None:
    expected = repo.read_bytes(BIG)
    with repo.open_file(BIG, prefetch=False) as handle:
        handle.seek(-10, 2)
        assert handle.read() == expected[-10:]
        assert handle.read(5) == b""
        handle.seek(1_000_000)
        assert handle.read(2_000_000) == expected[1_000_000:3_000_000]
        assert handle.tell() == 3_000_000
        buffer = bytearray(7)
        assert handle.readinto(buffer) == 7 and bytes(buffer) == expected[3_000_000:3_000_007]
        assert handle.pread(10, len(expected) + 5) == b""
        with pytest.raises(OSError):
            handle.seek(-1)


def test_prefetch_after_close_queues_nothing(reference_repo: Path, tmp_path: Path) -> None:
    repo = Repository.open(
        reference_repo / "cvmfs" / REF, public_key=reference_repo / "keys" / f"{REF}.pub",
        cache=tmp_path / "cache",
    )  # fmt: skip
    layout = repo.layout(BIG)
    repo.close()
    assert repo.prefetch_layout(layout) == []


def test_warm_command(reference_repo: Path, tmp_path: Path) -> None:
    from cvmfs_ml.cli.client import register_client_commands

    app = typer.Typer()
    register_client_commands(app)
    args = [
        "warm", str(reference_repo / "cvmfs" / REF), "/big",
        "--key", str(reference_repo / "keys" / f"{REF}.pub"), "--cache", str(tmp_path / "c"),
        "--parallel", "2",
    ]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["files"] == 1 and data["bytes"] == 25165824 and data["fetched_pieces"] == 26
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "warmed 1 files, 25165824 bytes" in second.output and "0 pieces" in second.output
    missing = CliRunner().invoke(app, [*args[:2], "/no/such/model", *args[3:]])
    assert missing.exit_code == 1
