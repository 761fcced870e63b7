"""Catalogs beyond the open-connection bound close while idle and read (or write) on as before.

The bounds are lowered here so that a handful of catalogs goes past them; the memory they save
at full size is measured in tests/publish/test_publish_memory.py.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs import catalog as catalog_module
from cvmfs_ml.cvmfs import catalog_writer
from cvmfs_ml.cvmfs.catalog import Catalog, DirectoryEntry, WritableCatalog
from cvmfs_ml.errors import FormatError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings

CATALOGS = 10


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(catalog_module._OPEN, "capacity", 3)
    monkeypatch.setattr(catalog_writer._WRITING, "capacity", 2)
    yield


def _catalog_file(path: Path, names: list[str]) -> Path:
    root = DirectoryEntry(path="", mode=stat.S_IFDIR | 0o755, size=4096, mtime=1, hardlinks=2)
    writable = WritableCatalog.create(path, root, nested=False)
    for name in names:
        writable.put(
            DirectoryEntry(path=f"/{name}", mode=stat.S_IFREG | 0o644, size=len(name), mtime=1)
        )
    writable.finalize(revision=1, last_modified=1, previous_revision=None, subtree={})
    return path


def test_read_only_catalogs_past_the_bound_reopen_and_answer(
    small_bounds: None, tmp_path: Path
) -> None:
    catalogs = [
        Catalog(_catalog_file(tmp_path / f"c{i}.db", [f"file{i}", f"other{i}"]), "")
        for i in range(CATALOGS)
    ]
    for _ in range(3):  # round robin: every query after the first round reopens
        for i, catalog in enumerate(catalogs):
            entry = catalog.lookup(f"/file{i}")
            assert entry is not None and entry.size == len(f"file{i}")
            assert [e.name for e in catalog.listing("")] == [f"file{i}", f"other{i}"]
            assert len(catalog_module._OPEN) <= 3
    catalogs[0].close()
    with pytest.raises(FormatError, match="closed"):
        catalogs[0].lookup("/file0")
    for catalog in catalogs[1:]:
        catalog.close()
    assert len(catalog_module._OPEN) == 0


def test_threads_sharing_catalogs_past_the_bound_never_see_a_closed_connection(
    small_bounds: None, tmp_path: Path
) -> None:
    catalogs = [Catalog(_catalog_file(tmp_path / f"c{i}.db", [f"f{i}"]), "") for i in range(8)]
    errors: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            for round_ in range(300):
                i = (round_ + offset) % len(catalogs)
                entry = catalogs[i].lookup(f"/f{i}")
                assert entry is not None and entry.name == f"f{i}"
        except BaseException as exc:  # reported below, with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and errors == []
    for catalog in catalogs:
        catalog.close()


def test_a_publish_writing_more_catalogs_than_the_bound_keeps_every_edit(
    small_bounds: None, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for i in range(CATALOGS):
        version = src / "models" / f"v{i}"
        version.mkdir(parents=True)
        (version / ".cvmfscatalog").touch()
        (version / "weights.bin").write_bytes(bytes([i]) * (100 + i))
        (version / "sub").mkdir()
        (version / "sub" / "config.json").write_text(f'{{"v": {i}}}')
    (src / "plain").mkdir()
    (src / "plain" / "a.txt").write_text("a")
    publisher = create_repository(tmp_path / "srv", "bound.test", settings=PublishSettings())
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    (src / "plain" / ".cvmfscatalog").touch()  # splits an existing folder off its catalog
    (src / "models" / "v3" / "sub" / "new.txt").write_text("new")
    with publisher.transaction() as txn:
        txn.add_folder(src, "/")
        txn.commit()
    with Repository.open(
        publisher.repo_dir, fqrn="bound.test", public_key=publisher.keys.paths.master_public,
        cache=tmp_path / "cache",
    ) as repo:  # fmt: skip
        for i in range(CATALOGS):
            assert repo.read_bytes(f"/models/v{i}/weights.bin") == bytes([i]) * (100 + i)
            assert repo.read_bytes(f"/models/v{i}/sub/config.json") == f'{{"v": {i}}}'.encode()
        assert repo.read_bytes("/models/v3/sub/new.txt") == b"new"
        assert repo.read_bytes("/plain/a.txt") == b"a"
        mountpoints = {ref.path for ref in repo.root.nested_catalogs()}
        assert "/plain" in mountpoints and "/models/v0" in mountpoints
