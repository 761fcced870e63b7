"""Where the model publisher keeps what it reads back of a repository (index, ``model.json``,
aliases) while it publishes: in the user's cache folder, never in other users' space.

It sat in the system temporary folder (``TMPDIR``, a shared ``/tmp``) as a ``mkdtemp`` folder
removed at exit, so every publisher killed (``kill -9``, the OOM killer, and a plain SIGTERM,
which runs no exit handler) left up to 256 MiB there for good. It is now a folder held with a
lock (:func:`cvmfs_ml.storage.held.held_folder`) under ``$XDG_CACHE_HOME/cvmfs-ml/publisher``
(``~/.cache``), 0700, that the next publisher removes once its process is gone. Where that
folder is another user's or open to others (a shared ``XDG_CACHE_HOME``), the temporary folder
is used instead, the same way, and nothing of the other user's is read, written or removed.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

OTHER_UID = 4242

# Publish a model into a new repository, then leave as a killed process does (no exit
# handler runs) or normally; prints the folders it read the repository through.
SCRIPT = """
import os, sys
from pathlib import Path
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.publish import publish_model
from cvmfs_ml.publish.repository import Publisher, create_repository

root, fqrn, src, version, how = sys.argv[1:]
srv = Path(root) / fqrn
publisher = Publisher.open(srv) if srv.exists() else create_repository(Path(root), fqrn)
publish_model(publisher, Path(src), ModelRef("t", "m", version))
print("published", flush=True)
if how == "killed":
    os._exit(0)
"""


def _env(tmp_path: Path, xdg: Path, tmpdir: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "TMPDIR", "HOME")}
    return {**keep, "XDG_CACHE_HOME": str(xdg), "TMPDIR": str(tmpdir),
            "HOME": str(tmp_path / "home")}  # fmt: skip


def _publish(tmp_path: Path, env: dict[str, str], version: str, how: str) -> None:
    src = tmp_path / f"src{version}"
    src.mkdir()
    (src / "w.bin").write_bytes(version.encode())
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "srv"), "cache.test", str(src), version, how],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "published", done.stderr[-3000:]


def _shared_tmp(tmp_path: Path) -> Path:
    """A folder like /tmp: everyone writes, the sticky bit keeps each one's names theirs."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return shared


def _everything(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def test_a_killed_publisher_leaves_nothing_in_tmp_and_its_cache_goes_with_the_next(
    tmp_path: Path,
) -> None:
    shared = _shared_tmp(tmp_path)
    xdg = tmp_path / "xdg"
    env = _env(tmp_path, xdg, shared)
    _publish(tmp_path, env, "1", "killed")
    assert _everything(shared) == [], "the publisher's cache is in the shared temporary folder"
    base = xdg / "cvmfs-ml" / "publisher"
    left = [p for p in base.iterdir() if p.is_dir()]
    assert len(left) == 1, _everything(base)  # what the killed process read through
    info = os.lstat(left[0])
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700

    _publish(tmp_path, env, "2", "normally")  # removes the killed one's, and its own at exit
    assert [p for p in base.iterdir()] == [], _everything(base)
    assert _everything(shared) == []


def test_a_cache_folder_of_another_user_is_not_used(tmp_path: Path) -> None:
    """``XDG_CACHE_HOME`` on a shared folder where another user made ``cvmfs-ml`` (open to all,
    a link in it to their own folder): the publisher keeps out of it, in a private folder of
    the temporary folder, and leaves the other user's names there alone."""
    if os.geteuid() != 0:
        pytest.skip("making another user's files needs root")
    shared = _shared_tmp(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    hostile = shared / "cvmfs-ml"
    hostile.mkdir()
    os.chmod(hostile, 0o777)
    (hostile / "publisher").symlink_to(theirs)
    planted = shared / "cvmfs-ml-publisher.planted"  # a name like ours, another user's
    planted.mkdir()
    (shared / "cvmfs-ml-publisher.planted.lock").touch()
    for path in (theirs, hostile, hostile / "publisher", planted,
                 shared / "cvmfs-ml-publisher.planted.lock"):  # fmt: skip
        os.lchown(path, OTHER_UID, OTHER_UID)
    before = _everything(shared) + _everything(theirs)

    env = _env(tmp_path, shared, shared)  # XDG_CACHE_HOME and TMPDIR: the shared folder
    _publish(tmp_path, env, "1", "killed")
    assert _everything(theirs) == []
    mine = [p for p in _everything(shared) if p not in before]
    assert mine, "the cache was made somewhere else than the temporary folder"
    assert all(os.lstat(p).st_uid == os.geteuid() for p in mine)
    top = [p for p in mine if p.parent == shared and p.is_dir()]
    assert len(top) == 1 and stat.S_IMODE(os.lstat(top[0]).st_mode) == 0o700, mine

    _publish(tmp_path, env, "2", "normally")
    assert _everything(shared) + _everything(theirs) == before


# Look up a version as sync and ingest do before publishing (published_record), and die while
# its model.json is being read, as a killed process does.
LOOKUP_SCRIPT = """
import os, sys
from pathlib import Path
import cvmfs_ml.models.sources.base as base
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.publish.repository import Publisher

def killed(*args, **kwargs):
    os._exit(0)

base.read_record = killed
base.published_record(Publisher.open(Path(sys.argv[1])), ModelRef("t", "m", "1"))
"""


def test_a_lookup_killed_half_way_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    """``published_record`` read through a cache of its own in the temporary folder
    (``Repository.connect`` without a cache), which a kill left there for good."""
    shared = _shared_tmp(tmp_path)
    env = _env(tmp_path, tmp_path / "xdg", shared)
    _publish(tmp_path, env, "1", "normally")
    done = subprocess.run(
        [sys.executable, "-c", LOOKUP_SCRIPT, str(tmp_path / "srv" / "cache.test")],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _everything(shared) == [], "the lookup's cache is in the shared temporary folder"
