"""Live updates: mounts and fsspec instances follow revisions published after they started.

A repository is published with a short TTL (``CVMFS_REPOSITORY_TTL``, 2 s) and served over HTTP
on loopback; then a second revision moves files, adds one and moves the ``prod`` alias. Checked:
a mount and an fsspec instance see it within TTL + a few seconds (waits are deadlines, polled);
a file opened before reads its old bytes to the end; names looked up as missing appear; a
pinned mount (``--tag``) and a pinned fsspec instance do not move; with the server stopped the
mount keeps serving and ``reload`` says why it failed, and once the server is back the mount
catches up; ``reload`` on a long TTL takes the new revision at once and ``invalidate_cache()``
does the same for fsspec; ``CVMFS_MAX_TTL`` caps the TTL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.client import register_client_commands
from cvmfs_ml.client.fsspec import CvmfsFileSystem
from cvmfs_ml.client.mounts import MountHandle
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer
from waiting import wait_until

FQRN = "live.test"
SLACK = 60.0  # seconds beyond the TTL a loaded CI machine may need (waits end when done)
OLD_BLOB = os.urandom(3 * 2**20 + 17)
NEW_BLOB = os.urandom(3 * 2**20 + 5)


@dataclass
class Served:
    publisher: Publisher
    server: RepositoryServer
    key: Path

    @property
    def url(self) -> str:
        return f"{self.server.url}/cvmfs/{FQRN}"


def _publish_v1(publisher: Publisher) -> None:
    with publisher.transaction() as txn:
        txn.add_bytes("/data/blob.bin", OLD_BLOB)
        txn.add_bytes("/data/note.txt", b"one")
        txn.add_bytes("/models/tagger/1/tagger.onnx", b"weights v1")
        txn.symlink("/models/tagger/prod", "1")
        txn.commit(tag="v1")


def _publish_v2(publisher: Publisher) -> float:
    """Publish revision 2; returns the moment it was published (monotonic clock)."""
    with publisher.transaction() as txn:
        txn.add_bytes("/data/blob.bin", NEW_BLOB)
        txn.add_bytes("/data/note.txt", b"two")
        txn.add_bytes("/data/new.txt", b"new")
        txn.add_bytes("/models/tagger/2/tagger.onnx", b"weights v2")
        txn.symlink("/models/tagger/prod", "2")
        txn.commit(tag="v2")
    return time.monotonic()


def _serve(tmp_path: Path, ttl: int) -> Served:
    settings = PublishSettings(
        compression=Compression.ZLIB, min_chunk_size=256 * 1024, avg_chunk_size=512 * 1024,
        max_chunk_size=1024 * 1024, workers=2, ttl=ttl,
    )  # fmt: skip
    publisher = create_repository(tmp_path / "srv", FQRN, settings=settings)
    _publish_v1(publisher)
    server = RepositoryServer(publisher.repo_dir.parent).start()
    return Served(publisher, server, publisher.keys.paths.master_public)


@pytest.fixture
def short_ttl(tmp_path: Path) -> Iterator[Served]:
    served = _serve(tmp_path, ttl=2)
    yield served
    served.server.stop()


@pytest.fixture
def long_ttl(tmp_path: Path) -> Iterator[Served]:
    served = _serve(tmp_path, ttl=600)
    yield served
    served.server.stop()


def cli() -> typer.Typer:
    app = typer.Typer()
    register_client_commands(app)
    return app


def revision(point: Path) -> int:
    return int(os.getxattr(point, "user.revision"))


def stats(point: Path) -> dict:
    result = CliRunner().invoke(cli(), ["stats", str(point), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- mounts ----------------------------------------------------------------------------------------
@pytest.mark.service
def test_mount_follows_new_revisions_and_keeps_serving_offline(
    mounter: Callable[..., MountHandle], short_ttl: Served, tmp_path: Path
) -> None:
    live = mounter(short_ttl.url, public_key=short_ttl.key)
    pinned = mounter(short_ttl.url, public_key=short_ttl.key, tag="v1")
    root, frozen = live.mountpoint, pinned.mountpoint
    assert revision(root) == 1 and revision(frozen) == 1
    assert os.getxattr(root, "user.fqrn") == FQRN.encode()
    assert os.getxattr(root, "user.host").decode() == short_ttl.url
    assert "user.tag" not in os.listxattr(root) and os.getxattr(frozen, "user.tag") == b"v1"
    assert (root / "models/tagger/prod/tagger.onnx").read_bytes() == b"weights v1"
    assert not (root / "data/new.txt").exists()  # the kernel caches "missing" as well
    assert (root / "data/note.txt").read_bytes() == b"one"
    opened = open(root / "data/blob.bin", "rb", buffering=0)  # noqa: SIM115
    try:
        head = opened.read(100_000)
        assert head == OLD_BLOB[:100_000]

        published = _publish_v2(short_ttl.publisher)
        wait_until(lambda: revision(root) == 2, 2 + SLACK, "the mount taking revision 2")
        seen = time.monotonic() - published
        assert os.readlink(root / "models/tagger/prod") == "2"
        assert (root / "models/tagger/prod/tagger.onnx").read_bytes() == b"weights v2"
        assert (root / "data/note.txt").read_bytes() == b"two"
        assert (root / "data/new.txt").read_bytes() == b"new"
        assert (root / "data/blob.bin").read_bytes() == NEW_BLOB
        assert os.stat(root / "data/blob.bin").st_size == len(NEW_BLOB)
        # the file opened before the publish reads the revision it opened, to the end
        rest = opened.read()
        assert head + rest == OLD_BLOB
        assert os.fstat(opened.fileno()).st_size == len(OLD_BLOB)
    finally:
        opened.close()
    root_hash = os.getxattr(root, "user.root_hash").decode()
    assert root_hash == short_ttl.publisher.manifest().catalog.hex
    print(f"publish-to-visible with a 2 s TTL: {seen:.2f} s")

    # the pinned mount stays where it was, also when asked to reload
    result = CliRunner().invoke(cli(), ["reload", str(frozen)])
    assert result.exit_code == 0, result.output
    assert "pinned at revision 1" in result.stdout
    assert revision(frozen) == 1 and os.readlink(frozen / "models/tagger/prod") == "1"
    assert (frozen / "data/note.txt").read_bytes() == b"one"
    assert not (frozen / "data/new.txt").exists()

    counters = stats(root)
    assert counters["revision"] == 2 and counters["refresh"]["switches"] >= 1
    assert counters["fetch"]["objects"] > 0 and counters["fetch"]["bytes"] > len(NEW_BLOB)
    assert counters["cache"]["misses"] > 0
    assert counters["fuse"]["opens"] >= 5
    failures = counters["refresh"]["failures"]

    # offline: checks fail, the mount keeps serving revision 2 and says why a reload failed
    short_ttl.server.stop()
    wait_until(lambda: stats(root)["refresh"]["failures"] > failures, 2 + SLACK,
             "a failed check with the server stopped")  # fmt: skip
    assert (root / "data/note.txt").read_bytes() == b"two"
    assert (root / "data/blob.bin").read_bytes() == NEW_BLOB
    assert sorted(os.listdir(root / "data")) == ["blob.bin", "new.txt", "note.txt"]
    result = CliRunner().invoke(cli(), ["reload", str(root)])
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "still serving revision 2" in message
    assert revision(root) == 2 and stats(root)["refresh"]["last_error"]

    # back online: the next check (retried within a TTL) takes what was published meanwhile
    with short_ttl.publisher.transaction() as txn:
        txn.add_bytes("/data/note.txt", b"three")
        txn.commit()
    port = short_ttl.server.port
    short_ttl.server = RepositoryServer(short_ttl.publisher.repo_dir.parent, port=port).start()
    wait_until(lambda: revision(root) == 3, 2 + SLACK,
               "the mount taking revision 3 after the outage")  # fmt: skip
    assert (root / "data/note.txt").read_bytes() == b"three"
    assert stats(root)["refresh"]["last_error"] is None


@pytest.mark.service
def test_reload_takes_a_new_revision_now(
    mounter: Callable[..., MountHandle], long_ttl: Served
) -> None:
    handle = mounter(long_ttl.url, public_key=long_ttl.key)
    root = handle.mountpoint
    assert os.readlink(root / "models/tagger/prod") == "1"
    assert not (root / "data/new.txt").exists()
    assert int(os.getxattr(root, "user.expires")) >= 9  # minutes to the next check
    _publish_v2(long_ttl.publisher)
    assert revision(root) == 1  # a 600 s TTL: no check yet
    result = CliRunner().invoke(cli(), ["reload", str(root)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{root}: revision 1 -> 2"
    # visible as soon as reload returns: no waiting
    assert os.readlink(root / "models/tagger/prod") == "2"
    assert (root / "data/new.txt").read_bytes() == b"new"
    assert (root / "data/note.txt").read_bytes() == b"two"
    again = CliRunner().invoke(cli(), ["reload", str(root), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["changed"] is False


# -- fsspec ----------------------------------------------------------------------------------------
def _fs(served: Served, tmp_path: Path, **options: object) -> CvmfsFileSystem:
    return CvmfsFileSystem(url=served.url, public_key=str(served.key),
                           cache=str(tmp_path / "fs-cache"), skip_instance_cache=True,
                           **options)  # fmt: skip


def test_fsspec_instance_follows_new_revisions(short_ttl: Served, tmp_path: Path) -> None:
    fs = _fs(short_ttl, tmp_path)
    pinned = _fs(short_ttl, tmp_path, tag="v1")
    try:
        assert fs.cat(f"{FQRN}/data/note.txt") == b"one"
        assert pinned.cat(f"{FQRN}/data/note.txt") == b"one"
        opened = fs.open(f"{FQRN}/data/blob.bin", "rb", block_size=64 * 1024, prefetch=False)
        head = opened.read(100_000)
        _publish_v2(short_ttl.publisher)
        wait_until(lambda: fs.cat(f"{FQRN}/data/note.txt") == b"two", 2 + SLACK,
                 "the fsspec instance taking revision 2")  # fmt: skip
        assert fs.info(f"{FQRN}/models/tagger/prod")["destination"] == "2"
        assert fs.cat(f"{FQRN}/data/blob.bin") == NEW_BLOB
        assert fs.cat(f"{FQRN}/data/new.txt") == b"new"
        assert head + opened.read() == OLD_BLOB
        opened.close()
        pinned.invalidate_cache()  # a pinned instance never moves, not even when asked
        assert pinned.cat(f"{FQRN}/data/note.txt") == b"one"
        assert pinned.info(f"{FQRN}/models/tagger/prod")["destination"] == "1"
    finally:
        fs.close()
        pinned.close()


def test_fsspec_invalidate_cache_forces_a_check(long_ttl: Served, tmp_path: Path) -> None:
    fs = _fs(long_ttl, tmp_path)
    try:
        assert fs.cat(f"{FQRN}/data/note.txt") == b"one"
        _publish_v2(long_ttl.publisher)
        assert fs.cat(f"{FQRN}/data/note.txt") == b"one"  # within the 600 s TTL
        fs.invalidate_cache()
        assert fs.cat(f"{FQRN}/data/note.txt") == b"two"
        assert fs.info(f"{FQRN}/models/tagger/prod")["destination"] == "2"
        long_ttl.server.stop()
        fs.invalidate_cache()  # fails, logged: the instance keeps serving revision 2
        assert fs.cat(f"{FQRN}/data/note.txt") == b"two"
        assert fs.repository().revision == 2
    finally:
        fs.close()


# -- the TTL ---------------------------------------------------------------------------------------
def test_ttl_comes_from_the_publisher_and_is_capped_by_max_ttl(
    long_ttl: Served, tmp_path: Path
) -> None:
    from cvmfs_ml.client.locate import open_target
    from cvmfs_ml.errors import ConfigError

    assert long_ttl.publisher.manifest().ttl == 600  # the manifest's D mirrors the catalog TTL
    config = tmp_path / "client.conf"
    with open_target(long_ttl.url, public_key=long_ttl.key, cache=tmp_path / "c") as repo:
        assert repo.ttl == 600.0 and 590 < repo.seconds_to_check <= 600
    config.write_text("CVMFS_MAX_TTL=2\n")  # minutes, as upstream
    with open_target(long_ttl.url, public_key=long_ttl.key, cache=tmp_path / "c",
                     config_files=[config]) as repo:  # fmt: skip
        assert repo.ttl == 120.0
    config.write_text("CVMFS_MAX_TTL=soon\n")
    with pytest.raises(ConfigError, match="CVMFS_MAX_TTL"):
        open_target(long_ttl.url, public_key=long_ttl.key, cache=tmp_path / "c",
                    config_files=[config])  # fmt: skip

    # CVMFS_ROOT_HASH pins a revision, as upstream: a newer one is never taken
    first = long_ttl.publisher.manifest().catalog.hex
    _publish_v2(long_ttl.publisher)
    config.write_text(f"CVMFS_ROOT_HASH={first}\n")
    with open_target(long_ttl.url, public_key=long_ttl.key, cache=tmp_path / "c",
                     config_files=[config]) as repo:  # fmt: skip
        assert repo.pinned and repo.revision == 1
        assert repo.refresh() is False and repo.revision == 1
        assert repo.read_bytes("/data/note.txt") == b"one"


def test_tree_changes_names_what_a_new_revision_changed(long_ttl: Served, tmp_path: Path) -> None:
    from cvmfs_ml.client.fuse_live import tree_changes
    from cvmfs_ml.client.repository import Repository

    paths = ["", "/data", "/data/note.txt", "/data/blob.bin", "/models", "/models/tagger",
             "/models/tagger/prod", "/models/tagger/1", "/models/tagger/1/tagger.onnx"]  # fmt: skip
    with Repository.open(long_ttl.url, public_key=long_ttl.key, cache=tmp_path / "c") as repo:
        inode = {path: number for number, path in enumerate(paths, 1)}
        known = [(path, inode[path], repo.stat(path)) for path in paths]
        missing = [(inode["/data"], "/data/new.txt"), (inode["/data"], "/data/never")]
        assert not tree_changes(repo, known, missing)  # same revision: nothing to tell
        _publish_v2(long_ttl.publisher)
        assert repo.refresh() is True
        changes = tree_changes(repo, known, missing)
    assert sorted(path for path, _ in changes.renamed) == [
        "/data/blob.bin", "/data/note.txt", "/models/tagger/prod"]  # fmt: skip
    assert all(number == inode[path] for path, number in changes.renamed)
    folders = {number for number, entry in changes.folders}
    assert folders <= {inode[p] for p in ("", "/data", "/models", "/models/tagger")}
    assert all(entry.is_dir for _, entry in changes.folders)
    assert inode["/models/tagger"] in folders  # a new child: the folder's entry changed
    assert changes.appeared == [(inode["/data"], "/data/new.txt")]


def test_a_refresh_walks_the_new_revisions_nested_catalogs(tmp_path: Path) -> None:
    """Lookups start at the deepest catalog already walked to; a refresh must start them over
    (the old revision's /sub/deep catalog answering for the new one would serve stale bytes)."""
    from cvmfs_ml.client.repository import Repository
    from cvmfs_ml.errors import NotFoundError

    publisher = create_repository(tmp_path / "srv", "nested.live.test")
    with publisher.transaction() as txn:
        for path in ("/sub", "/sub/deep", "/sub/deep/er"):
            txn.add_bytes(f"{path}/.cvmfscatalog", b"")
        txn.add_bytes("/sub/deep/x", b"one")
        txn.add_bytes("/sub/deep/er/gone", b"old")
        txn.commit()
    key = publisher.keys_dir / f"{publisher.fqrn}.pub"
    with Repository.open(str(publisher.repo_dir), public_key=key) as repo:
        assert repo.read_bytes("/sub/deep/x") == b"one"
        assert repo.read_bytes("/sub/deep/er/gone") == b"old"
        with publisher.transaction() as txn:
            txn.add_bytes("/sub/deep/x", b"two")
            txn.remove("/sub/deep/er/gone")
            txn.commit()
        assert repo.read_bytes("/sub/deep/x") == b"one"  # no refresh yet: the old revision
        assert repo.refresh()
        assert repo.read_bytes("/sub/deep/x") == b"two"
        with pytest.raises(NotFoundError):
            repo.stat("/sub/deep/er/gone")
        assert [e.name for e in repo.listdir("/sub/deep/er")] == [".cvmfscatalog"]


def _hard_linked_tarball(path: Path, content: bytes) -> Path:
    """A tarball with /links/a and /links/b, one file with two names (a hard-link group)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("links/a")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("links/b")
        link.type, link.linkname = tarfile.LNKTYPE, "links/a"
        tar.addfile(link)
    return path


@pytest.mark.service
def test_a_new_revision_of_hard_linked_files_is_read_after_reload(
    mounter: Callable[..., MountHandle], long_ttl: Served, tmp_path: Path
) -> None:
    """The group (folder, number) comes back in the new revision: it must get a new inode,
    not the old one, which a reader still holds open with its pages in the kernel."""
    publisher = long_ttl.publisher
    with publisher.transaction() as txn:
        txn.add_tarball(_hard_linked_tarball(tmp_path / "one.tar", b"one"), "/")
        txn.commit()
    root = mounter(long_ttl.url, public_key=long_ttl.key).mountpoint
    assert (root / "links/a").read_bytes() == b"one"
    assert (root / "links/a").stat().st_ino == (root / "links/b").stat().st_ino
    held = (root / "links/a").open("rb")
    with publisher.transaction() as txn:
        txn.remove("/links")  # the folder starts again: the new group is number 1 again
        txn.add_tarball(_hard_linked_tarball(tmp_path / "two.tar", b"two"), "/")
        txn.commit()
    result = CliRunner().invoke(cli(), ["reload", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "links/a").read_bytes() == b"two"
    assert (root / "links/b").read_bytes() == b"two"
    assert held.read() == b"one"  # a file opened before reads the revision it opened
    held.close()
