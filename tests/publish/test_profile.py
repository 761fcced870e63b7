"""The publish's own per-stage counters (issue 14 item 1) and the read-ahead of large files."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish import ingest
from cvmfs_ml.publish.profile import STAGES, StageClock
from cvmfs_ml.publish.repository import Publisher

from .conftest import write_tree


def test_stage_clock_sums_calls_and_bytes_across_threads() -> None:
    clock = StageClock()

    def work() -> None:
        for _ in range(100):
            with clock.measure("hash", 10):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    with clock.measure("read"):
        pass
    totals = clock.totals()
    assert list(totals) == ["read", "hash"]  # pipeline order, not the order first seen
    assert totals["hash"].calls == 400 and totals["hash"].bytes == 4000
    assert clock.as_dict()["read"]["calls"] == 1


def test_publish_reports_where_its_time_went(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    pub = make_repo(compression=Compression.NONE)
    big = os.urandom(3 * 2**20)  # chunked (256 KiB max chunks): many pieces
    src = write_tree(tmp_path / "src", {"w/model.bin": big, "small.txt": b"hello"})
    with pub.transaction() as txn:
        txn.add_folder(src)
        result = txn.commit()
    stages = result.stats.stages.totals()
    for name in ("read", "chunk", "hash", "write", "catalog", "history", "fsync", "sign_swap"):
        assert name in stages, name
        assert name in STAGES  # every measured stage is described for the report
    # compression none: every input byte is hashed once, and new objects are written whole
    assert stages["hash"].bytes == len(big) + 5
    assert stages["chunk"].bytes == len(big)
    assert stages["write"].bytes == result.stats.bytes_stored
    assert stages["fsync"].calls == 1
    assert "compress" not in stages
    assert all(t.wall >= 0 and t.cpu >= 0 for t in stages.values())


def test_compression_is_measured_separately(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    pub = make_repo(compression=Compression.ZLIB)
    src = write_tree(tmp_path / "src", {"a.bin": b"abc" * 400_000})
    with pub.transaction() as txn:
        txn.add_folder(src)
        result = txn.commit()
    stages = result.stats.stages.totals()
    assert stages["compress"].bytes == 1_200_000
    assert stages["hash"].bytes == result.stats.bytes_stored + result.stats.bytes_existing
    assert stages["hash"].bytes < 1_200_000  # the compressed bytes are hashed, not the input


def test_read_ahead_follows_the_reader_and_skips_sources_without_a_descriptor(
    tmp_path: Path,
) -> None:
    assert ingest._ReadAhead(io.BytesIO(b"x" * 100)).fd is None
    path = tmp_path / "f"
    path.write_bytes(b"\0" * 1000)
    with open(path, "rb") as handle:
        ahead = ingest._ReadAhead(handle)
        assert ahead.fd == handle.fileno()
        ahead.advance()
        assert ahead.ahead == ingest._READ_AHEAD
        first = ahead.ahead
        ahead.position = ingest._BLOCK
        ahead.advance()
        assert ahead.ahead == ingest._BLOCK + ingest._READ_AHEAD > first


def test_a_large_unchunked_file_is_measured_too(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    pub = make_repo(compression=Compression.NONE, use_chunking=False)
    size = ingest._WHOLE_IN_MEMORY + 12345  # streamed through one codec in the reading thread
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(size))
    with pub.transaction() as txn:
        txn.add_folder(src)
        result = txn.commit()
    stages = result.stats.stages.totals()
    assert stages["hash"].bytes == size and stages["write"].bytes == size
    assert stages["read"].calls >= size // ingest._BLOCK
