"""Mounts that behave: a second mount leaves the first alone, non-empty folders need --nonempty,
and the daemon reports its counters (``cvmfs-ml stats``) and upstream's ``user.*`` attributes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.client import register_client_commands
from cvmfs_ml.client.mounts import MountHandle, is_mounted, mount
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.storage.http import RepositoryServer

pytestmark = pytest.mark.service

FQRN = "behave.test"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Publisher]]:
    """(URL, master key, publisher) of a small repository served on loopback."""
    base = tmp_path_factory.mktemp("behave")
    publisher = create_repository(base / "srv", FQRN, settings=PublishSettings(workers=2))
    with publisher.transaction() as txn:
        txn.add_bytes("/hello.txt", b"hello\n")
        txn.add_bytes("/data/blob.bin", os.urandom(300_000))
        txn.commit()
    server = RepositoryServer(publisher.repo_dir.parent).start()
    yield f"{server.url}/cvmfs/{FQRN}", publisher.keys.paths.master_public, publisher
    server.stop()


def cli() -> typer.Typer:
    app = typer.Typer()
    register_client_commands(app)
    return app


def test_second_mount_on_a_mounted_folder_leaves_the_first_working(
    mounter: Callable[..., MountHandle], served: tuple[str, Path, Publisher], tmp_path: Path
) -> None:
    url, key, _publisher = served
    first = mounter(url, public_key=key)
    point = first.mountpoint
    with pytest.raises(ConfigError, match=r"already a mount point .*cvmfs-ml:behave\.test"):
        mount(url, point, public_key=key, cache=tmp_path / "other-cache", timeout=30)
    result = CliRunner().invoke(cli(), ["mount", url, str(point), "--key", str(key), "-d",
                                        "--cache", str(tmp_path / "cli-cache")])  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already a mount point" in lines[0] and "stays mounted" in lines[0]
    assert is_mounted(point)
    assert (point / "hello.txt").read_bytes() == b"hello\n"
    assert first.process is not None and first.process.poll() is None


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_mount_interrupted_while_starting_leaves_no_mount_or_daemon(
    served: tuple[str, Path, Publisher], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    interrupt: type[BaseException],
) -> None:
    """Ctrl-C, or a SIGTERM (the CLI turns it into SystemExit), after the daemon mounted but
    before ``mount()`` returned the handle: the caller cannot unmount what it never got, and
    the daemon runs in its own session, so before this the mount and daemon stayed behind
    (the demo's SIGTERM test caught it on a loaded machine)."""
    import cvmfs_ml.client.mounts as mounts
    from waiting import wait_until

    url, key, _publisher = served
    point = tmp_path / "mnt"
    point.mkdir()
    started: list[int] = []
    real_wait = mounts._wait_ready

    def interrupted_once_mounted(read_fd: int, process: subprocess.Popen[bytes],
                                 timeout: float) -> str:  # fmt: skip
        started.append(process.pid)
        wait_until(lambda: is_mounted(point), 60, "the daemon mounted")
        raise interrupt()

    monkeypatch.setattr(mounts, "_wait_ready", interrupted_once_mounted)
    with pytest.raises(interrupt):
        mount(url, point, public_key=key, cache=tmp_path / "cache", timeout=60)
    monkeypatch.setattr(mounts, "_wait_ready", real_wait)
    assert not is_mounted(point)
    wait_until(lambda: not os.path.exists(f"/proc/{started[0]}"), 60, "the daemon exited")
    handle = mount(url, point, public_key=key, cache=tmp_path / "cache", timeout=60)
    try:  # the folder is usable again at once
        assert (point / "hello.txt").read_bytes() == b"hello\n"
    finally:
        handle.unmount()


def test_a_daemon_stopped_just_after_mounting_unmounts(
    served: tuple[str, Path, Publisher], tmp_path: Path
) -> None:
    """SIGTERM between the mount and the loop's signal receiver ended the daemon by the signal's
    default action, with the mount left behind, dead (the demo's SIGTERM test failed on a
    loaded machine twice). The signal is sent by the daemon itself right after ``pyfuse3.init``
    mounted, so the test lands in that window every time."""
    import sys

    url, key, _publisher = served
    point = tmp_path / "mnt"
    point.mkdir()
    code = (
        "import os, signal, sys, pyfuse3\n"
        "real = pyfuse3.init\n"
        "def init(*args, **kwargs):\n"
        "    real(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # mounted; the loop is not running yet\n"
        "pyfuse3.init = init\n"
        "from cvmfs_ml.client import fuse_daemon\n"
        "sys.argv[0] = 'fuse_daemon'\n"
        "fuse_daemon._module_main()\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, url, str(point), "--key", str(key),
             "--cache", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert "before serving: unmounting" in done.stderr
        assert not is_mounted(point)
    finally:
        if is_mounted(point):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, timeout=30)


def test_dead_daemon_mount_is_reported_and_can_be_cleared(
    mounter: Callable[..., MountHandle], served: tuple[str, Path, Publisher], tmp_path: Path
) -> None:
    url, key, _publisher = served
    first = mounter(url, public_key=key)
    point = first.mountpoint
    assert first.process is not None
    first.process.kill()  # the daemon dies; the kernel keeps a mount that answers ENOTCONN
    first.process.wait(timeout=60)
    with pytest.raises(ConfigError, match="already a mount point"):
        mount(url, point, public_key=key, cache=tmp_path / "c2", timeout=30)
    result = CliRunner().invoke(cli(), ["umount", str(point)])
    assert result.exit_code == 0, result.output
    again = mount(url, point, public_key=key, cache=tmp_path / "c2", timeout=60,
                  log_file=tmp_path / "again.log")  # fmt: skip
    try:
        assert (point / "hello.txt").read_bytes() == b"hello\n"
    finally:
        again.unmount()


def test_non_empty_folder_needs_nonempty(
    served: tuple[str, Path, Publisher], tmp_path: Path, require_fuse: None
) -> None:
    url, key, _publisher = served
    point = tmp_path / "busy"
    point.mkdir()
    (point / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"not empty.*--nonempty"):
        mount(url, point, public_key=key, cache=tmp_path / "cache", timeout=30)
    result = CliRunner().invoke(cli(), ["mount", url, str(point), "--key", str(key), "-d",
                                        "--cache", str(tmp_path / "cache")])  # fmt: skip
    assert result.exit_code == 1 and "--nonempty" in result.stderr
    assert not is_mounted(point)
    handle = mount(url, point, public_key=key, cache=tmp_path / "cache", timeout=60,
                   nonempty=True, log_file=tmp_path / "fuse.log")  # fmt: skip
    try:
        assert (point / "hello.txt").read_bytes() == b"hello\n"
        assert not (point / "mine.txt").exists()  # hidden while mounted, as asked
    finally:
        handle.unmount()
    assert (point / "mine.txt").read_text() == "keep me"


def test_stats_and_upstream_attributes(
    mounter: Callable[..., MountHandle], served: tuple[str, Path, Publisher], tmp_path: Path
) -> None:
    url, key, publisher = served
    handle = mounter(url, public_key=key, cache=tmp_path / "shared")
    root = handle.mountpoint
    for _ in range(2):  # the second read comes from the kernel's page cache
        assert len((root / "data/blob.bin").read_bytes()) == 300_000
    attributes = {name: os.getxattr(root, name) for name in os.listxattr(root)}
    manifest = publisher.manifest()
    assert attributes["user.revision"] == str(manifest.revision).encode()
    assert attributes["user.root_hash"] == manifest.catalog.hex.encode()
    assert attributes["user.host"] == url.encode()
    assert attributes["user.fqrn"] == FQRN.encode()
    assert attributes["user.proxy"] == b"DIRECT"
    assert int(attributes["user.nopen"]) == 2
    assert int(attributes["user.ndownload"]) > 0 and int(attributes["user.nclg"]) >= 1
    assert "user.cvmfs_ml.reload" not in attributes  # control attributes are not listed

    result = CliRunner().invoke(cli(), ["stats", str(root), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["fqrn"] == FQRN and stats["revision"] == manifest.revision
    assert stats["pid"] == handle.pid
    assert stats["fetch"]["bytes"] >= 300_000 * 0.9 and stats["fetch"]["failovers"] == 0
    # the root catalog and the file's object went through the cache (the certificate is
    # checked by the trust core, not cached)
    assert stats["cache"]["misses"] >= 2 and stats["cache"]["hits"] == 0
    assert stats["refresh"]["pinned"] is False and stats["refresh"]["ttl_seconds"] == 240
    assert stats["fuse"]["opens"] == 2
    text = CliRunner().invoke(cli(), ["stats", str(root)])
    assert text.exit_code == 0 and "failovers: 0" in text.stdout

    not_ours = CliRunner().invoke(cli(), ["stats", str(handle.mountpoint.parent)])
    assert not_ours.exit_code == 1
    assert "not the root of a cvmfs-ml mount" in not_ours.stderr.strip()

    # a second mount on the same cache finds everything there: hits, no misses, no fetches
    second = mounter(url, public_key=key, cache=tmp_path / "shared")
    assert len((second.mountpoint / "data/blob.bin").read_bytes()) == 300_000
    warm = json.loads(CliRunner().invoke(cli(), ["stats", str(second.mountpoint), "--json"]).stdout)
    assert warm["cache"]["misses"] == 0 and warm["cache"]["hits"] >= 2
    assert warm["cache"]["hit_rate"] == 1.0
    assert warm["fetch"]["objects"] == 2  # .cvmfspublished and .cvmfswhitelist only


def test_only_root_and_the_owner_may_reload(
    served: tuple[str, Path, Publisher], require_fuse: None
) -> None:
    """Anyone who reads the mount may read its counters; a reload needs root or the owner."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or system_python is None:
        pytest.skip("needs root, and a python3 that another user may run, to ask as nobody")
    url, key, _publisher = served
    outside = Path(tempfile.mkdtemp(prefix="cvmfs-ml-other."))  # reachable by nobody
    try:
        os.chmod(outside, 0o755)
        point = outside / "mnt"
        point.mkdir()
        handle = mount(url, point, public_key=key, cache=outside / "cache", timeout=60,
                       allow_other=True)  # fmt: skip
        try:
            probe = ("import os,sys\n"
                     "for name in ('user.cvmfs_ml.stats', 'user.cvmfs_ml.reload'):\n"
                     "    try: os.getxattr(sys.argv[1], name); print(name, 'ok')\n"
                     "    except OSError as e: print(name, e.errno)\n")  # fmt: skip
            done = subprocess.run(
                [system_python, "-c", probe, str(point)], capture_output=True, text=True,
                timeout=30, check=True, user=65534, env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert done.stdout.splitlines() == [
                "user.cvmfs_ml.stats ok", f"user.cvmfs_ml.reload {errno.EPERM}"]  # fmt: skip
            assert json.loads(os.getxattr(point, "user.cvmfs_ml.reload"))["ok"] is True  # root
        finally:
            handle.unmount()
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_daemon_that_outlives_sigkill_still_has_its_mount_detached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A daemon blocked on a request to its own mount is in uninterruptible sleep: SIGKILL
    takes effect only once the mount goes. A process that survives SIGKILL cannot be made on
    purpose, so this one is a stand-in; the unmount must still be tried (it frees the daemon),
    where a timeout waiting for the kill used to skip it."""
    from cvmfs_ml.client import mounts

    unmounted: list[Path] = []

    class Unkillable:
        def poll(self) -> int | None:
            return 0 if unmounted else None

        def terminate(self) -> None:
            pass

        def kill(self) -> None:
            pass

        def wait(self, timeout: float | None = None) -> int:
            if not unmounted:
                raise subprocess.TimeoutExpired("cvmfs-ml mount", timeout or 0)
            return 0

    monkeypatch.setattr(mounts, "mounted_source", lambda point: "cvmfs-ml:stuck.test")
    monkeypatch.setattr(mounts, "unmount", lambda point, **_: unmounted.append(point))
    handle = MountHandle(tmp_path, pid=1, process=Unkillable())  # type: ignore[arg-type]
    mounts._stop_started(handle)
    assert unmounted == [tmp_path]
