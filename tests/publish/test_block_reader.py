"""A large file's blocks are read on a thread of their own: same chunks, errors in order."""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import pytest

from cvmfs_ml.cvmfs.chunking import cut_points
from cvmfs_ml.cvmfs.hashing import hash_bytes
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, object_path
from cvmfs_ml.publish.ingest import ContentPipeline
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.storage.local import LocalStore
from cvmfs_ml.storage.pagecache import drop_cached_pages

SETTINGS = PublishSettings(compression=Compression.NONE)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "repo")
    store.create_skeleton()
    return store


class Trickle(io.RawIOBase):
    """Bytes handed out in small, odd reads (as a socket does); fails after ``fail_after``."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self._data = memoryview(data)
        self._at = 0
        self._fail_after = fail_after
        self.threads: set[str] = set()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        if self._fail_after is not None and self._at >= self._fail_after:
            raise OSError("connection reset by the test")
        n = min(len(buffer), 3 * 2**20 + 17, len(self._data) - self._at)
        memoryview(buffer).cast("B")[:n] = self._data[self._at : self._at + n]
        self._at += n
        return n


def item(source: io.RawIOBase, size: int) -> SourceItem:
    return SourceItem("/f", stat.S_IFREG | 0o644, 0, size=size, open=lambda: source)


def test_a_large_file_is_read_ahead_and_chunked_as_in_one_pass(store: LocalStore) -> None:
    data = os.urandom(70 * 2**20)
    source = Trickle(data)
    with ContentPipeline(store, SETTINGS) as pipeline:
        content = pipeline.add(item(source, len(data))).result()
    assert source.threads == {"cvmfs-ml-read"}  # read on the reader thread
    cuts = cut_points(data, SETTINGS.chunk_params)
    assert [c.offset for c in content.chunks] == [0, *cuts]
    for chunk in content.chunks:
        piece = data[chunk.offset : chunk.offset + chunk.size]
        assert chunk.digest == hash_bytes(piece, SETTINGS.hash_algorithm)
        assert store.get_bytes(object_path(chunk.digest, ObjectKind.PARTIAL)) == piece


def test_a_small_file_is_read_on_the_calling_thread(store: LocalStore) -> None:
    data = os.urandom(10 * 2**20)
    source = Trickle(data)
    with ContentPipeline(store, SETTINGS) as pipeline:
        pipeline.add(item(source, len(data))).result()
    assert source.threads == {threading.current_thread().name}


def test_a_read_error_midway_reaches_the_caller_and_frees_every_block(store: LocalStore) -> None:
    data = os.urandom(200 * 2**20)
    with ContentPipeline(store, SETTINGS) as pipeline:
        with pytest.raises(OSError, match="reset by the test"):
            pipeline.add(item(Trickle(data, fail_after=150 * 2**20), len(data))).result()
        # the pipeline still works: blocks read ahead were given back
        again = os.urandom(40 * 2**20)
        content = pipeline.add(item(Trickle(again), len(again))).result()
    assert sum(c.size for c in content.chunks) == len(again)
    assert not [t for t in threading.enumerate() if t.name == "cvmfs-ml-read"]


def test_a_cold_file_from_disk(store: LocalStore, tmp_path: Path) -> None:
    data = os.urandom(24 * 2**20 + 5)
    path = tmp_path / "cold.bin"
    path.write_bytes(data)
    drop_cached_pages(path)
    source = SourceItem("/f", stat.S_IFREG | 0o644, 0, size=len(data), open=lambda: path.open("rb"))
    with ContentPipeline(store, SETTINGS) as pipeline:
        content = pipeline.add(source).result()
    assert [c.offset for c in content.chunks] == [0, *cut_points(data, SETTINGS.chunk_params)]
