"""A mount lets go of the inodes the kernel forgets (FUSE ``forget``).

The daemon used to keep the path and entry of every inode it ever handed out: ``ls`` of a large
folder grew it for good. Here a folder of many files is listed and stat'ed through a mount, the
kernel is made to drop its dentries and inodes (``drop_caches``, root only), and the daemon's
inode count (``cvmfs-ml stats``) must fall back, while a file held open keeps reading and the
folder lists again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.client import register_client_commands
from cvmfs_ml.client.mounts import MountHandle
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

pytestmark = pytest.mark.service

FQRN = "forget.test"
FILES = 2000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    base = tmp_path_factory.mktemp("forget")
    src = base / "src" / "many"
    src.mkdir(parents=True)
    for i in range(FILES):
        (src / f"f{i:05d}").write_text(str(i))
    publisher = create_repository(base / "srv", FQRN, settings=PublishSettings(workers=2))
    with publisher.transaction() as txn:
        txn.add_folder(base / "src", "/")
        txn.commit()
    server = RepositoryServer(publisher.repo_dir.parent).start()
    yield f"{server.url}/cvmfs/{FQRN}", publisher.keys.paths.master_public
    server.stop()


def _inodes(root: Path) -> int:
    app = typer.Typer()
    register_client_commands(app)
    result = CliRunner().invoke(app, ["stats", str(root), "--json"])
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["fuse"]["inodes"])


@pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches (making the kernel forget) needs root")
def test_inodes_the_kernel_forgets_are_let_go(
    mounter: Callable[..., MountHandle], served: tuple[str, Path]
) -> None:
    url, key = served
    root = mounter(url, public_key=key).mountpoint
    names = sorted(os.listdir(root / "many"))
    assert len(names) == FILES
    for name in names:
        assert (root / "many" / name).stat().st_size == len(str(int(name[1:])))
    assert _inodes(root) >= FILES
    held = (root / "many" / "f00007").open()
    deadline = time.monotonic() + 60
    while (count := _inodes(root)) > 10:
        # The kernel prunes unused dentries and inodes and sends their forgets.
        Path("/proc/sys/vm/drop_caches").write_text("2")
        assert time.monotonic() < deadline, f"{count} inodes still held after drop_caches"
    assert held.read() == "7"  # an open file's inode stays with the kernel and the daemon
    held.close()
    assert sorted(os.listdir(root / "many")) == names
    assert (root / "many" / "f01999").read_text() == "1999"
