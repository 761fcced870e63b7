"""A FUSE mount shows what upstream's mount shows (issue 8, item 5): variant and absolute links,
aliases, external files, devices, a name that is not UTF-8 and a hidden entry (``parity_repo``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import parity_repo as case
from cvmfs_ml.testing import Nginx

pytestmark = pytest.mark.service

_FUSE_READY = bool(
    importlib.util.find_spec("pyfuse3")
    and shutil.which("fusermount3")
    and os.access("/dev/fuse", os.R_OK | os.W_OK)
)


def test_fuse_mount_shows_what_upstream_shows(
    nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    if not _FUSE_READY:  # CI must be able to mount; a developer machine may not
        (pytest.fail if os.environ.get("CI") else pytest.skip)("FUSE (pyfuse3, /dev/fuse) missing")
    from cvmfs_ml.client.fuse import is_mounted, mount

    parity: case.ParityRepo = case.publish_parity_repo(tmp_path / "repo")
    served = nginx_factory(parity.root)
    config = tmp_path / "client.conf"
    config.write_text(
        f"CVMFS_SERVER_URL={served.repo_url(case.FQRN)}\n"
        f"CVMFS_EXTERNAL_URL={served.url}/cvmfs/{case.EXTERNAL_DIR}\n"
        "PARITY_SITE=cern\n"
    )
    point = tmp_path / "mnt"
    point.mkdir()
    handle = mount(
        case.FQRN, point, public_key=parity.public_key, config_files=[config],
        cache=tmp_path / "cache", log_file=tmp_path / "fuse.log", timeout=60.0,
    )  # fmt: skip
    try:
        want = parity.original("/hep/tagger/1/tagger.onnx")
        assert (point / "hep/tagger/prod/tagger.onnx").read_bytes() == want
        assert (point / "ext/big.bin").read_bytes() == parity.original("/ext/big.bin")
        assert os.readlink(point / "links/variant") == "cern/conf.txt"
        assert (point / "links/variant").read_text() == "site=cern\n"
        assert os.readlink(point / "links/abs") == "/etc/hostname"
        null = os.stat(point / "dev/null", follow_symlinks=False)
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == case.CHAR_DEV and null.st_size == 0
        sda = os.stat(point / "dev/sda", follow_symlinks=False)
        assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == case.BLOCK_DEV
        names = os.fsencode(point / "names")
        assert os.listdir(names) == [case.LATIN1_NAME]
        with open(names + b"/" + case.LATIN1_NAME, "rb") as latin1:
            assert latin1.read() == b"latin-1 name\n"
        hard = [os.stat(point / p.lstrip("/")) for p in case.HARDLINKS]
        assert hard[0].st_ino == hard[1].st_ino and hard[0].st_nlink == 2
        assert os.stat(point / "links/cern/conf.txt").st_ino != hard[0].st_ino
        assert "hidden.txt" not in os.listdir(point)
        assert (point / "hidden.txt").read_text() == "hidden\n"
        listing = subprocess.run(
            ["ls", "-l", str(point / "dev")], capture_output=True, text=True, check=True,
            timeout=30,
        ).stdout  # fmt: skip
        assert "1, 3" in listing and "8, 0" in listing  # ls shows major, minor
    finally:
        handle.unmount(timeout=15)
        if is_mounted(point):
            subprocess.run(["fusermount3", "-uz", str(point)], check=False)
