"""Rows are written as each entry's content settles, in the source's order, so what a later entry
says about an earlier one is settled as it comes: a marker after its directory's other entries,
a dirtab after the directories it selects, a hard link to a chunked file written before it.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.publish import entry_writer
from cvmfs_ml.publish.repository import Publisher

from .test_hostile_ingest import _archive, add, open_repo
from .test_tree_edits import assert_clean_and_nested

DIR = {"type": tarfile.DIRTYPE}


def test_a_marker_after_its_directorys_files_and_a_nested_catalog_below(
    make_repo, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    def build(a: tarfile.TarFile) -> None:
        add(a, "d", **DIR)
        add(a, "d/a", b"a")
        add(a, "d/sub", **DIR)
        add(a, "d/sub/.cvmfscatalog")
        add(a, "d/sub/f", b"f")
        add(a, "d/z", b"z")
        add(a, "d/.cvmfscatalog")  # last: /d's rows, and /d/sub's catalog, move below it

    publisher: Publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "late-marker.tar", build), "/m")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, "/m/d", "/m/d/sub")
        assert [repo.read_bytes(p) for p in ("/m/d/a", "/m/d/z", "/m/d/sub/f")] == [
            b"a", b"z", b"f"
        ]  # fmt: skip
        assert not repo.stat("/m").is_nested_mountpoint


def test_a_dirtab_after_the_directories_it_selects(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def build(a: tarfile.TarFile) -> None:
        for name in ("sw", "sw/pkg", "sw/pkg/1", "sw/pkg/skip"):
            add(a, name, **DIR)
        add(a, "sw/pkg/1/lib.so", b"lib")
        add(a, "sw/pkg/skip/x", b"x")
        add(a, "sw/pkg/2", **DIR)  # one before the dirtab, one after it
        add(a, ".cvmfsdirtab", b"/sw/pkg/*\n! /sw/pkg/skip\n")
        add(a, "sw/pkg/3", **DIR)
        add(a, "sw/pkg/3/bin", b"bin")

    publisher: Publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "dirtab-last.tar", build), "/")
        txn.commit()
    with open_repo(publisher) as repo:
        assert_clean_and_nested(repo, "/sw/pkg/1", "/sw/pkg/2", "/sw/pkg/3")
        for version in (1, 2, 3):
            assert repo.stat(f"/sw/pkg/{version}/.cvmfscatalog").size == 0
        skip = repo.stat("/sw/pkg/skip")
        assert not (skip.is_nested_mountpoint or skip.is_nested_root)
        assert repo.read_bytes("/sw/pkg/1/lib.so") == b"lib"
        assert repo.read_bytes("/sw/pkg/3/bin") == b"bin"


def test_a_hard_link_takes_a_chunked_leaders_content(make_repo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    weights = os.urandom(1_000_000)  # chunks of 64-256 KiB (make_repo's settings)

    def build(a: tarfile.TarFile) -> None:
        add(a, "a", **DIR)
        add(a, "a/weights.bin", weights)
        add(a, "a/same.bin", type=tarfile.LNKTYPE, linkname="a/weights.bin")
        add(a, "b/copy.bin", type=tarfile.LNKTYPE, linkname="a/weights.bin")

    publisher: Publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_tarball(_archive(tmp_path, "links.tar", build), "/m")
        txn.commit()
    with open_repo(publisher) as repo:
        leader = repo.layout("/m/a/weights.bin")
        assert len(leader.pieces) > 1
        for path in ("/m/a/same.bin", "/m/b/copy.bin"):
            assert repo.layout(path).pieces == leader.pieces
            assert repo.read_bytes(path) == weights
        assert check_repository(repo).ok


def test_a_publish_holds_a_bounded_number_of_entries_in_flight(
    make_repo, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Rows are written while the walk goes on: the writer never holds more than its cap."""
    monkeypatch.setattr(entry_writer, "MAX_UNSETTLED", 8)
    monkeypatch.setattr(entry_writer, "WRITE_BATCH", 4)
    held: list[int] = []
    real_add = entry_writer.EntryWriter.add

    def add_and_count(self: entry_writer.EntryWriter, item) -> None:  # type: ignore[no-untyped-def]
        real_add(self, item)
        held.append(len(self._unsettled))

    monkeypatch.setattr(entry_writer.EntryWriter, "add", add_and_count)
    src = tmp_path / "many"
    for i in range(300):
        (src / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 7}" / f"f{i}").write_bytes(os.urandom(i % 5 * 100))
    publisher: Publisher = make_repo()
    with publisher.transaction() as txn:
        txn.add_folder(src, "/many")
        txn.commit()
    assert len(held) == 308 and max(held) <= 8
    with open_repo(publisher) as repo:
        assert sum(1 for _ in repo.walk("/many")) >= 300
        assert check_repository(repo).ok
