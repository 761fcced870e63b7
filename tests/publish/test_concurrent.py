"""One writer at a time, whatever the keys folder; the manifest swap is a compare-and-swap.

The lock lives with the repository (beside its folder), so two publishers holding copies of the
keys in different folders still take turns; and a transaction whose starting revision changed
under it (a writer that did not take the lock) fails instead of dropping that revision.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.repository import MANIFEST, Publisher
from cvmfs_ml.storage.local import LocalStore

from .conftest import write_tree


def _publish_command(repo: Path, src: Path, at: str, keys: Path) -> list[str]:
    return [
        sys.executable, "-m", "cvmfs_ml.cli", "repo", "publish", str(repo), str(src),
        "--at", at, "--keys", str(keys), "--json",
    ]  # fmt: skip


def test_publishers_with_copied_keys_take_turns(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    publisher = make_repo()
    repo = publisher.repo_dir
    keys_b = tmp_path / "keys-copy"
    shutil.copytree(publisher.keys_dir, keys_b)
    assert not any(p.suffix == ".lock" for p in publisher.keys_dir.iterdir())
    landed: list[str] = []
    for round_ in range(3):
        processes = []
        for name, keys in (("a", publisher.keys_dir), ("b", keys_b)):
            src = write_tree(
                tmp_path / f"src-{round_}-{name}",
                {f"f{i}.txt": f"{round_} {name} {i}\n" * 100 for i in range(30)}
                | {"w.bin": bytes(range(256)) * 4096},
            )
            at = f"/r{round_}{name}"
            command = _publish_command(repo, src, at, keys)
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            processes.append((at, process))
        for at, process in processes:
            _out, err = process.communicate(timeout=300)
            if process.returncode == 0:
                landed.append(at)
            else:  # a clean failure: one line, no traceback
                assert err.startswith("cvmfs-ml: ") and len(err.strip().splitlines()) == 1, err
    assert landed, "no publish landed at all"
    with Repository.connect(repo, public_key=publisher.keys.paths.master_public) as reader:
        assert reader.manifest.revision == len(landed)  # no revision lost
        names = {f"/{e.name}" for e in reader.listdir("/")}
        assert names == set(landed)
        report = check_repository(reader)
        assert report.ok, report.problems
    assert not list((repo / "data" / "txn").iterdir())  # nobody's leftovers


def test_swap_against_a_changed_manifest_fails_and_keeps_it(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    publisher = make_repo()
    src = write_tree(tmp_path / "src", {"a.txt": "a\n"})
    with publisher.transaction() as txn:
        txn.add_folder(src, "/a")
        # A writer that ignores the lock (an old version, another host on a shared folder).
        rogue = Publisher.open(publisher.repo_dir, publisher.keys_dir)
        rogue_store = rogue.store
        other = write_tree(tmp_path / "other", {"b.txt": "b\n"})
        raw_before = rogue_store.get_bytes(MANIFEST)
        _commit_without_lock(rogue, other, "/b")
        assert rogue_store.get_bytes(MANIFEST) != raw_before
        with pytest.raises(PublishError, match="changed while this transaction ran"):
            txn.commit()
    with Repository.connect(
        publisher.repo_dir, public_key=publisher.keys.paths.master_public
    ) as reader:
        assert reader.manifest.revision == 1
        assert [e.name for e in reader.listdir("/")] == ["b"]
        assert check_repository(reader).ok


def _commit_without_lock(publisher: Publisher, src: Path, at: str) -> None:
    """Commit as a publisher that does not take the repository lock would."""
    from cvmfs_ml.publish.repository import Transaction

    txn = Transaction(publisher)
    txn._lock = contextlib.nullcontext()
    txn._base = publisher._manifest_raw()
    txn.add_folder(src, at)
    txn.commit()


class _RecordingStore(LocalStore):
    """A LocalStore that records the order of flushes and swaps (power loss cannot be made)."""

    events: list[str]

    def flush(self) -> None:
        self.events.append("flush")
        super().flush()

    def swap_bytes(self, rel_path: str, data: bytes, expected: bytes | None) -> None:
        self.events.append(f"swap {rel_path}")
        super().swap_bytes(rel_path, data, expected)


def test_objects_are_durable_before_the_manifest_swap(
    make_repo: Callable[..., Publisher], tmp_path: Path
) -> None:
    made = make_repo()
    store = _RecordingStore(made.repo_dir)
    store.events = []
    publisher = Publisher(made.repo_dir, made.keys_dir, store=store)
    src = write_tree(tmp_path / "src", {"a.txt": "a\n", "w.bin": b"x" * 300_000})
    with publisher.transaction() as txn:
        txn.add_folder(src)
        txn.commit()
    publisher.tag("named")
    assert store.events == ["flush", f"swap {MANIFEST}", "flush", f"swap {MANIFEST}"]
