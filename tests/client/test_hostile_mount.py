"""A FUSE mount of a signed but hostile repository keeps serving what is sane.

The root catalog of a freshly published repository gets one spoiled row (SQL), signed with the
repository's own key (tests/signed_spoils.py): a signature says who signed, not that the rows
are sane. The spoiled file must fail on its own (EIO) while the rest of the mount
keeps working.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from cvmfs_ml.client.fuse import is_mounted, mount
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import ObjectKind
from cvmfs_ml.errors import FormatError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from signed_spoils import publish_spoiled

from .test_fuse import _require_fuse  # noqa: F401 - skip (or fail in CI) without FUSE

FQRN = "hostile-mount.test"


def spoiled_repository(root: Path, sql: str, args: tuple) -> Publisher:
    """Revision 2: revision 1 with ``sql`` applied to its root catalog, signed."""
    publisher = create_repository(root, FQRN, settings=PublishSettings(workers=1))
    with publisher.transaction() as txn:
        txn.add_bytes("/dir/file.txt", b"content")
        txn.add_bytes("/dir/other.txt", b"other")
        txn.add_bytes("/good.txt", b"good")
        txn.commit()
    publish_spoiled(publisher, root, ObjectKind.CATALOG, sql, args)
    return publisher


@pytest.mark.service
@pytest.mark.parametrize(
    ("assignments", "match"),
    [
        ("uid = -1", "uid -1 is out of range"),
        ("gid = 4294967296", "gid 4294967296 is out of range"),
        ("mode = 4295000484", "mode 4295000484 is out of range"),  # 0o100644 + 2**32
        # a time past what a timespec holds, once the nanoseconds are added
        (f"mtime = {2**63 - 1}, mtimens = 1000000000", "mtimens 1000000000 is out of range"),
    ],
)
def test_an_out_of_range_row_fails_one_file_not_the_mount(
    tmp_path: Path, assignments: str, match: str
) -> None:
    """Before, a row whose uid, gid or mode did not fit the kernel's 32 bits (uid -1), or
    whose nanoseconds were not 0-999999999, passed the catalog's checks, and the mount's
    first stat of it raised OverflowError inside the FUSE loop: the daemon died and every path
    of the mount answered ENOTCONN, then ENOENT. Such a row is now refused where rows are read
    (FormatError), so the mount answers EIO for that one file and serves the rest."""
    publisher = spoiled_repository(
        tmp_path / "srv", f"UPDATE catalog SET {assignments} WHERE name = 'file.txt'", ()
    )
    key = publisher.keys.paths.master_public
    with Repository.open(publisher.repo_dir, public_key=key, cache=tmp_path / "c") as repo:
        with pytest.raises(FormatError, match=match):
            repo.stat("/dir/file.txt")
        assert repo.read_bytes("/good.txt") == b"good"
    point = tmp_path / "mnt"
    point.mkdir()
    handle = mount(publisher.repo_dir, point, public_key=key, cache=tmp_path / "cache",
                   log_file=tmp_path / "fuse.log", timeout=60.0)  # fmt: skip
    try:
        with pytest.raises(OSError) as caught:
            os.stat(point / "dir" / "file.txt")
        assert caught.value.errno == errno.EIO
        assert (point / "good.txt").read_bytes() == b"good"  # the daemon is still serving
        assert is_mounted(point)
    finally:
        handle.unmount(timeout=15)
        if is_mounted(point):
            subprocess.run(["fusermount3", "-uz", str(point)], check=False)
    assert "out of range" in (tmp_path / "fuse.log").read_text()


@pytest.mark.service
def test_a_name_longer_than_name_max_does_not_hide_its_folder(tmp_path: Path) -> None:
    """Before, one entry named with 10,000 characters made the kernel refuse the whole
    listing of its folder (EIO: a FUSE directory entry holds at most 1024 bytes), with nothing
    in the mount's log. No lookup of a name over NAME_MAX (255 bytes) reaches the daemon, so
    the mount now leaves such names out of listings, says so in its log, and lists the rest."""
    publisher = spoiled_repository(
        tmp_path / "srv", "UPDATE catalog SET name = ? WHERE name = 'file.txt'", ("x" * 10_000,)
    )
    key = publisher.keys.paths.master_public
    point = tmp_path / "mnt"
    point.mkdir()
    handle = mount(publisher.repo_dir, point, public_key=key, cache=tmp_path / "cache",
                   log_file=tmp_path / "fuse.log", timeout=60.0)  # fmt: skip
    try:
        assert os.listdir(point / "dir") == ["other.txt"]
        assert (point / "dir" / "other.txt").read_bytes() == b"other"
    finally:
        handle.unmount(timeout=15)
        if is_mounted(point):
            subprocess.run(["fusermount3", "-uz", str(point)], check=False)
    assert "longer than 255 bytes" in (tmp_path / "fuse.log").read_text()
