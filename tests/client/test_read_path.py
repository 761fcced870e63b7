"""The fast read path: reads straight into the caller's buffer, page-in and skip of cached
pieces for reader-driven prefetch, and cache writes that survive short writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import ObjectCache
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


def _settle(repo: Repository) -> None:
    wait_until(lambda: repo.prefetcher.pending == 0, 60,
               lambda: f"{repo.prefetcher.pending} prefetches still pending")  # fmt: skip


def test_pread_into_crosses_pieces_and_stops_at_the_end(repo: Repository) -> None:
    expected = repo.read_bytes(BIG)
    layout = repo.layout(BIG)
    assert len(layout.pieces) > 2
    boundary = layout.pieces[1].offset
    with repo.open_file(BIG, prefetch=False) as handle:
        start, stop = boundary - 1000, layout.pieces[2].offset + 1000  # crosses two pieces
        buffer = bytearray(stop - start)
        assert handle.pread_into(buffer, start) == len(buffer)
        assert bytes(buffer) == expected[start:stop]
        tail = bytearray(100)
        assert handle.pread_into(tail, len(expected) - 10) == 10
        assert bytes(tail[:10]) == expected[-10:]
        assert handle.pread_into(tail, len(expected) + 5) == 0
        with pytest.raises(OSError):
            handle.pread_into(tail, -1)
        # pread_buffer: bytes inside a piece, filled in place across a boundary
        inside = handle.pread_buffer(1000, 10)
        across = handle.pread_buffer(2000, boundary - 1000)
        assert inside == expected[10:1010]
        assert across == expected[boundary - 1000 : boundary + 1000]


def test_readinto_of_a_whole_file_matches_its_hash(repo: Repository) -> None:
    expected = hashlib.sha256(repo.read_bytes(BIG)).hexdigest()
    digest = hashlib.sha256()
    view = memoryview(bytearray(5 * 2**20 + 3))  # not aligned to pieces on purpose
    with repo.open_file(BIG) as handle:
        while n := handle.readinto(view):
            digest.update(view[:n])
    assert digest.hexdigest() == expected


def test_reader_prefetch_skips_objects_it_recently_cached(repo: Repository) -> None:
    layout = repo.layout(BIG)
    first = repo.prefetcher.fetch_pieces(layout, page_in=True)
    assert len(first) == len({p.digest for p in layout.pieces})
    for future in first:
        future.result()
    _settle(repo)
    # a loader that opens the file again (once per tensor) queues nothing new
    assert repo.prefetcher.fetch_pieces(layout, page_in=True) == []
    # an explicit prefetch (warm) still checks every object
    again = repo.prefetcher.fetch_pieces(layout)
    assert len(again) == len(first)
    assert {f.result().how for f in again} == {"hit"}


def test_reader_prefetch_queues_evicted_pieces_again(repo: Repository) -> None:
    expected = repo.read_bytes(BIG)
    layout = repo.layout(BIG)
    for future in repo.prefetcher.fetch_pieces(layout, page_in=True):
        future.result()
    _settle(repo)
    repo.cache.evict_to(0)
    again = repo.prefetcher.fetch_pieces(layout, page_in=True)
    assert len(again) == len({p.digest for p in layout.pieces})
    assert {f.result().how for f in again} == {"fetch"}
    with repo.open_file(BIG) as handle:
        assert handle.read() == expected


def test_txn_file_writes_everything_and_checksums_it(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "cache")
    data = os.urandom(3 * 2**20 + 17)
    digest = Digest(Algorithm.SHA1, hashlib.sha1(data).digest())
    with cache.put_stream(digest) as txn:
        view = memoryview(data)
        for start in range(0, len(data), 2**20):
            assert txn.write(view[start : start + 2**20]) == len(view[start : start + 2**20])
    path = txn.committed_path
    assert path is not None and path.read_bytes() == data
    assert cache.verify(digest)
    cache.close()
