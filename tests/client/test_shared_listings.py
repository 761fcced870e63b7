"""Open handles of one directory share its listing (a listing of 300,000 entries is ~150 MB, and
every process that lists the directory opens a handle); a new revision gets its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cvmfs_ml.client.mount_control import read_mount_stats, reload_mount
from cvmfs_ml.client.mounts import MountHandle
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

FQRN = "listings.test"


def _fuse_counters(root: Path) -> dict[str, int]:
    return read_mount_stats(root)["fuse"]  # type: ignore[no-any-return]


def _names(fd: int) -> list[str]:
    os.lseek(fd, 0, os.SEEK_SET)
    return sorted(os.listdir(fd))


def test_directory_handles_share_one_listing_per_revision(
    mounter: Callable[..., MountHandle], tmp_path: Path
) -> None:
    publisher = create_repository(tmp_path / "srv", FQRN, settings=PublishSettings(workers=2))
    with publisher.transaction() as txn:
        for i in range(50):
            txn.add_bytes(f"/many/f{i:02d}", b"x")
        txn.commit()
    server = RepositoryServer(publisher.repo_dir.parent).start()
    try:
        key = publisher.keys.paths.master_public
        handle = mounter(f"{server.url}/cvmfs/{FQRN}", public_key=key)
        folder = handle.mountpoint / "many"
        before = _fuse_counters(handle.mountpoint)
        first = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        second = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _names(first) == _names(second) == [f"f{i:02d}" for i in range(50)]
            during = _fuse_counters(handle.mountpoint)
        finally:
            os.close(first)
            os.close(second)
        assert during["dir_opens"] - before["dir_opens"] == 2
        assert during["dir_listings"] - before["dir_listings"] == 1  # the second shared it

        with publisher.transaction() as txn:  # a new revision: its own listing
            txn.add_bytes("/many/new", b"y")
            txn.commit()
        assert reload_mount(handle.mountpoint)["changed"]
        third = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert "new" in _names(third)
        finally:
            os.close(third)
        after = _fuse_counters(handle.mountpoint)
        assert after["dir_listings"] - during["dir_listings"] == 1
    finally:
        server.stop()
