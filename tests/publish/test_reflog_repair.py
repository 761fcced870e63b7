"""A damaged or lost ``.cvmfsreflog`` stops publishing with a way out, and is rebuilt as
upstream's ``cvmfs_server check -r`` rebuilds it: from the catalog and history chains.

Before, a reflog that no longer opened made every publish fail with an SQLite message naming a
temporary file, and a missing one was silently replaced by a reflog of the new revision alone.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.history import HistoryDb
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import PublishError
from cvmfs_ml.storage.base import open_store
from cvmfs_ml.storage.reflog_repair import reachable_references

from .conftest import write_tree


def _refs(reflog: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(f"file:{reflog}?mode=ro", uri=True) as db:
        return set(db.execute("SELECT hash, type FROM refs"))


def test_rebuilding_upstreams_reflog_gives_upstreams_references(reference_repo: Path) -> None:
    """Against the repository upstream's cvmfs_server 2.12 wrote: the walk finds exactly the
    references its own reflog holds (root catalogs of both revisions, both histories, the
    certificate and the meta-info)."""
    root = reference_repo / "cvmfs" / "ref.test.local"
    store = open_store(root, None)
    manifest = Manifest.parse((root / ".cvmfspublished").read_bytes())
    assert manifest.history is not None
    raw = store.fetch(object_path(manifest.history, ObjectKind.HISTORY), manifest.history,
                      compressed=True)  # fmt: skip
    with HistoryDb.from_bytes(raw) as history:
        tag_roots = [tag.root_catalog for tag in history.tags()]
    found = {(d.hex, int(kind)) for d, kind in reachable_references(store, manifest, tag_roots)}
    assert found == _refs(root / ".cvmfsreflog")
    assert len(found) >= 6


@pytest.mark.parametrize("damage", ["garbage", "missing", "other-reflog"])
def test_a_damaged_reflog_stops_publishing_until_repaired(
    make_repo, tmp_path: Path, damage: str
) -> None:
    publisher = make_repo()
    src = write_tree(tmp_path / "src", {"a.txt": b"one\n"})
    for name in ("first", "second"):
        with publisher.transaction() as txn:
            txn.add_folder(src, f"/{name}")
            txn.commit()
        if name == "first":
            publisher.tag("v1")
    reflog = publisher.repo_dir / ".cvmfsreflog"
    published = _refs(reflog)
    if damage == "garbage":
        reflog.write_bytes(b"\x00not a database" * 10)
    elif damage == "missing":
        reflog.unlink()
    else:  # a valid reflog, but not the one the manifest names (a stale copy)
        other = make_repo(fqrn="other.test")
        shutil.copy(other.repo_dir / ".cvmfsreflog", reflog)
    manifest_before = (publisher.repo_dir / ".cvmfspublished").read_bytes()

    with pytest.raises(PublishError, match="--repair-reflog"), publisher.transaction() as txn:
        txn.add_folder(src, "/third")
        txn.commit()
    assert (publisher.repo_dir / ".cvmfspublished").read_bytes() == manifest_before

    # `repo check` reports it (it said "ok" before), then repairs it and checks again
    checked = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "repo", "check", str(publisher.repo_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 1, (checked.stdout, checked.stderr)
    assert "--repair-reflog" in checked.stderr and checked.stdout.startswith("FAILED")
    done = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "repo", "check", str(publisher.repo_dir),
         "--repair-reflog"], capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rebuilt .cvmfsreflog" in done.stderr and done.stdout.startswith("ok")
    assert _refs(reflog) == published  # every reference, nothing more

    with publisher.transaction() as txn:
        txn.add_folder(src, "/third")
        txn.commit()
    with Repository.open(publisher.repo_dir,
                         public_key=publisher.keys.paths.master_public) as repo:  # fmt: skip
        assert repo.read_bytes("/third/a.txt") == b"one\n"
        assert check_repository(repo).ok


def test_repair_reflog_of_a_url_says_to_give_the_folder() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", "repo", "check", "http://127.0.0.1:9/cvmfs/a.test",
         "--repair-reflog"], capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "not a URL" in done.stderr


def test_publishing_needs_no_system_temporary_folder(
    make_repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reflog check at the start of a transaction copied the reflog to the system's
    temporary folder; a publisher whose ``/tmp`` is small, full or not writable failed there
    although every other scratch file goes to the repository's staging folder."""
    publisher = make_repo()
    src = write_tree(tmp_path / "src", {"a.txt": b"one\n"})
    with publisher.transaction() as txn:
        txn.add_folder(src, "/first")
        txn.commit()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-folder"))
    with publisher.transaction() as txn:
        txn.add_folder(src, "/second")
        txn.commit()
    assert publisher.manifest().revision == 2
