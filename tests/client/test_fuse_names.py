"""Issue 9: names that are not UTF-8 and tar hard-link groups, read back through a FUSE mount."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cvmfs_ml.client.fuse import is_mounted, mount
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.storage.http import RepositoryServer

from .test_fuse import _require_fuse  # noqa: F401 - skip (or fail in CI) without FUSE

pytestmark = pytest.mark.service

NAME = b"caf\xe9-\xff.bin"  # latin-1, not UTF-8


def test_bytes_names_and_hard_links_through_a_mount(tmp_path: Path) -> None:
    tarball = tmp_path / "names.tar"
    with tarfile.open(
        tarball, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for name, data in ((os.fsdecode(b"d/" + NAME), b"weights" * 100),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d/alias.bin")
        link.type = tarfile.LNKTYPE
        link.linkname = os.fsdecode(b"d/" + NAME)
        archive.addfile(link)
    publisher = create_repository(tmp_path / "srv", "names.test")
    with publisher.transaction() as txn:
        txn.add_tarball(tarball)
        txn.commit()
    point = tmp_path / "mnt"
    point.mkdir()
    with RepositoryServer(tmp_path / "srv") as server:
        handle = mount(
            f"{server.url}/cvmfs/names.test",
            point,
            public_key=publisher.keys_dir / "names.test.pub",
            cache=tmp_path / "cache",
            log_file=tmp_path / "fuse.log",
            timeout=60.0,
        )
        try:
            folder = os.fsencode(point / "d")
            assert sorted(os.listdir(folder)) == sorted([NAME, b"alias.bin"])
            with open(os.path.join(folder, NAME), "rb") as handle_file:
                assert handle_file.read() == b"weights" * 100
            linked = os.stat(os.path.join(folder, NAME))
            alias = os.stat(os.path.join(folder, b"alias.bin"))
            assert linked.st_nlink == alias.st_nlink == 2
            assert linked.st_size == alias.st_size == 700
            assert linked.st_ino == alias.st_ino  # one inode per group, as upstream's client
        finally:
            handle.unmount(timeout=15)
            if is_mounted(point):
                subprocess.run(["fusermount3", "-uz", str(point)], check=False)
