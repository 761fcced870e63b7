"""Cold reads (issue 8 item 9): cache files get their blocks reserved before a fetch streams
into them, and the fetcher reports where its CPU went per phase."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import PREALLOCATE_MIN_BYTES, ObjectCache, TxnFile, crc32, preallocate
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.hashing import hash_bytes
from services import Nginx

REF = "ref.test.local"
BIG = "/big/random-24MiB.bin"


def test_preallocate_reserves_blocks_and_keeps_the_size(tmp_path: Path) -> None:
    size = 4 * PREALLOCATE_MIN_BYTES
    with open(tmp_path / "f", "wb") as f:
        reserved = preallocate(f.fileno(), size)
        st = os.fstat(f.fileno())
        assert st.st_size == 0  # FALLOC_FL_KEEP_SIZE: the file still looks empty
        if reserved:  # file systems without fallocate are written as before
            assert reserved == size
            assert st.st_blocks * 512 >= size
    assert preallocate(os.open(tmp_path / "f", os.O_RDONLY), PREALLOCATE_MIN_BYTES - 1) == 0


def test_short_object_in_a_reserved_file_commits_its_true_size(tmp_path: Path) -> None:
    """A hint larger than what arrives (a retry, a lying catalog) must not leave padding or
    reserved blocks behind: the committed entry is exactly the bytes written, CRC included."""
    cache = ObjectCache(tmp_path / "cache")
    data = os.urandom(3 * PREALLOCATE_MIN_BYTES // 2)
    digest = hash_bytes(data)
    with cache.put_stream(digest, size_hint=8 * PREALLOCATE_MIN_BYTES) as txn:
        txn.write(b"x" * 1000)
        txn.seek(0)
        txn.truncate(0)  # what the fetcher does before a retry
        txn.write(data)
    path = cache.get_path(digest)
    assert path is not None
    assert path.read_bytes() == data
    st = path.stat()
    assert st.st_size == len(data)
    assert st.st_blocks * 512 < 4 * PREALLOCATE_MIN_BYTES  # the rest of the reservation freed
    assert cache.verify(digest, len(data))
    cache.close()


def test_txn_file_without_hint_is_unchanged(tmp_path: Path) -> None:
    txn = TxnFile(tmp_path / "t")
    txn.write(b"abc")
    size, crc = txn._finish()
    assert (size, crc) == (3, crc32(b"abc", 0))


@pytest.mark.service
def test_fetch_stats_count_cpu_per_phase(
    reference_nginx: Nginx, reference_repo: Path, tmp_path: Path
) -> None:
    """Every phase of a cold fetch over HTTP shows up in the fetcher's counters, and the phases
    never add up to more CPU than the process used; the big file's pieces were reserved."""
    url = reference_nginx.repo_url(REF)
    key = reference_repo / "keys" / f"{REF}.pub"
    with Repository.connect(url, REF, key, cache=tmp_path / "cache") as repo:
        before = repo.source.stats
        cpu0 = sum(os.times()[:2])
        data = repo.read_bytes(BIG)
        used = sum(os.times()[:2]) - cpu0
        delta = repo.source.stats - before
    assert len(data) == 24 * 2**20
    assert delta.bytes_received >= len(data)
    phases = (delta.receive_cpu_s, delta.hash_cpu_s, delta.store_cpu_s)
    assert all(p > 0 for p in phases)
    assert sum(phases) <= used + 0.05
