"""``replica sync`` of nested catalogs chained deeper than Python's recursion limit.

The repository is ``/a/a/a/...``, every level its own nested catalog (written with our catalog
writer, then published on top of that root through the public transaction API), served over
loopback by ``RepositoryServer``; ``cvmfs-ml replica sync`` runs as a real process whose open
file descriptors are watched while it walks the chain.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from cvmfs_ml.cvmfs.catalog import DirectoryEntry, Flag, NestedRef, WritableCatalog, totals
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import ObjectKind, deflate
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.storage.http import RepositoryServer
from waiting import wait_until

CLI = [sys.executable, "-m", "cvmfs_ml.cli"]
FQRN = "chain.test"
DEPTH = 3000  # far past sys.getrecursionlimit() (1000): the recursive walk hit RecursionError
STAMP = 1_700_000_000
MAX_FDS = 64  # the interpreter, the pool's sockets and a few files: not one per level


def _directory(path: str, flags: int = Flag.DIR, hardlinks: int = 2) -> DirectoryEntry:
    return DirectoryEntry(
        path=path, mode=stat.S_IFDIR | 0o755, size=4096, mtime=STAMP, hardlinks=hardlinks,
        flags=flags,
    )  # fmt: skip


def _upload_catalog(
    publisher: Publisher,
    scratch: Path,
    mountpoint: str,
    depth: int,
    entries: list[DirectoryEntry],
    child: tuple[NestedRef, dict[str, int]] | None,
) -> tuple[Digest, int, dict[str, int]]:
    """Write one catalog (its counters right, so ``repo check`` agrees) and store it."""
    catalog = WritableCatalog.create(scratch, _directory(mountpoint), nested=bool(mountpoint))
    for entry in entries:
        catalog.put(entry)
    if child is not None:  # the mount point row is a copy of the child's root row
        hardlinks = 2 if child[0].path == "/a" * depth else 3  # 3: the /a below it
        catalog.put(_directory(child[0].path, Flag.DIR | Flag.NESTED_MOUNTPOINT, hardlinks))
        catalog.set_nested(child[0])
    counters = catalog.finalize(
        revision=0,  # the transaction below makes the root revision 1
        last_modified=STAMP,
        previous_revision=None,
        subtree=totals(child[1]) if child is not None else {},
        ttl=240,
    )
    raw = scratch.read_bytes()
    scratch.unlink()
    digest = publisher.store.put_object(
        deflate(raw), ObjectKind.CATALOG, publisher.settings.hash_algorithm
    )
    return digest, len(raw), counters


def _publish_chain(root: Path, scratch: Path, depth: int) -> Publisher:
    """A repository whose catalogs nest ``depth`` levels deep, with ``leaf.txt`` at the bottom;
    each catalog is written at ``scratch`` first."""
    publisher = create_repository(root / "srv", FQRN, keys_dir=root / "keys")
    algorithm = publisher.settings.hash_algorithm
    leaf = publisher.store.put_object(deflate(b"leaf\n"), ObjectKind.FILE, algorithm)
    bottom = "/a" * depth
    entries = [
        DirectoryEntry(
            path=bottom + "/leaf.txt", mode=stat.S_IFREG | 0o644, size=5, mtime=STAMP,
            flags=Flag.FILE, digest=leaf,
        )
    ]  # fmt: skip
    child: tuple[NestedRef, dict[str, int]] | None = None
    for level in range(depth, -1, -1):  # bottom-up; level 0 is the root catalog
        mountpoint = "/a" * level
        digest, size, counters = _upload_catalog(
            publisher, scratch, mountpoint, depth, entries, child
        )
        child, entries = (NestedRef(mountpoint, digest, size), counters), []
    with publisher.transaction() as txn:  # a signed revision on top of the crafted root
        txn.start_from(digest)
        txn.add_bytes("/README", b"a deep chain of nested catalogs\n")
        txn.commit()
    return publisher


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:  # it has just exited
        return 0


def test_sync_of_a_nested_catalog_chain_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    # The sync runs as its own process, with Python's default limit (pytest's may be raised).
    limit = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys.getrecursionlimit())"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert int(limit) + 100 < DEPTH
    # SQLite syncs a new catalog's schema to disk statement by statement: on tmpfs, 10x faster
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as scratch:
        publisher = _publish_chain(tmp_path / "s0", Path(scratch) / "catalog.db", DEPTH)
    key = str(publisher.keys.paths.master_public)
    replica = tmp_path / "s1" / FQRN
    with RepositoryServer(tmp_path / "s0" / "srv") as server:
        url = f"{server.url}/cvmfs/{FQRN}"
        args = [*CLI, "replica", "sync", url, str(replica), "--key", key, "--workers", "4"]
        # files, not pipes: an unread pipe would stall a process writing a long traceback
        with (tmp_path / "out").open("w") as out_file, (tmp_path / "err").open("w") as err_file:
            sync = subprocess.Popen(args, stdout=out_file, stderr=err_file)
        try:
            peak = 0

            def finished() -> bool:
                nonlocal peak
                peak = max(peak, _open_fds(sync.pid))
                return sync.poll() is not None

            wait_until(finished, 120, "replica sync of the chain to finish", interval=0.02)
        finally:
            if sync.poll() is None:
                sync.kill()
                sync.wait()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert sync.returncode == 0, err[-2000:]
    assert err == "" and "Traceback" not in out
    assert f"{DEPTH + 2} catalogs" in out  # the chain, the root and revision 0 (trunk-previous)
    assert 0 < peak <= MAX_FDS, f"{peak} descriptors open at once"
    assert not [p for p in (replica / "data" / "txn").iterdir() if p.name != "replica.lock"]

    checked = subprocess.run(
        [*CLI, "repo", "check", str(replica), "--key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert f"{DEPTH + 2} catalogs" in checked.stdout and "ok" in checked.stdout

    again = subprocess.run(
        [*CLI, "replica", "sync", str(publisher.repo_dir), str(replica), "--key", key],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert f"{FQRN}: up to date" in again.stdout  # the root in the replica stops the walk
