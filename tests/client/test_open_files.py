"""A mount that many readers use at once, under a small limit on open files.

Each file being read keeps up to 16 pieces open, and a mount serves every job of a node: before,
the daemon kept the limit it was started with (often 1024), and once the pieces of the files
being read passed it every further read failed with EMFILE (sixty files at once under a limit
of 80 here). Now the daemon raises its limit as upstream's cvmfs2 does (``CVMFS_NFILES``), and
where the hard limit is small it closes the idle pieces of every open file and tries again.
A real mount, started under real limits.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings
from cvmfs_ml.testing.nginx import Nginx

pytestmark = pytest.mark.usefixtures("require_fuse")

FQRN = "nofile.test"
FILES = 60


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """60 files of 4 MB in 1-4 MiB pieces: about 180 pieces open when all are read at once."""
    base = tmp_path_factory.mktemp("nofile")
    settings = PublishSettings(
        compression="none", min_chunk_size=2**20, avg_chunk_size=2 * 2**20,
        max_chunk_size=4 * 2**20, workers=2,
    )  # fmt: skip
    publisher = create_repository(base / "srv", FQRN, settings=settings)
    digests = {}
    with publisher.transaction() as txn:
        for i in range(FILES):
            data = os.urandom(4_000_000)
            txn.add_bytes(f"/s{i}.bin", data)
            digests[f"s{i}.bin"] = hashlib.sha256(data).hexdigest()
        txn.commit()
    return publisher.repo_dir, digests


def mount_under_limit(
    target: str, point: Path, cache: Path, soft: int, hard: int, *extra: str
) -> int:
    """``cvmfs-ml mount -d`` with RLIMIT_NOFILE (soft, hard); the daemon's pid."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    point.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "mount", target, str(point), "--cache", str(cache),
         "-d", "--log", str(cache.parent / f"{point.name}.log"), *extra],
        capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(re.search(r"\(pid (\d+)\)", result.stdout).group(1))  # type: ignore[union-attr]


def read_all_at_once(point: Path) -> list[str]:
    """Open every file, read a piece of each, and only then the rest, all in parallel: every
    file has pieces open at the same time. The digests, or the errors."""
    handles = {name: open(point / name, "rb") for name in sorted(os.listdir(point))}  # noqa: SIM115
    everyone = threading.Barrier(len(handles))

    def read(name: str) -> str:
        digest = hashlib.sha256()
        try:
            with handles[name] as handle:
                try:
                    digest.update(handle.read(2**20))
                finally:
                    everyone.wait(timeout=120)
                while chunk := handle.read(2**20):
                    digest.update(chunk)
        except OSError as exc:
            return str(exc)
        return digest.hexdigest()

    with ThreadPoolExecutor(len(handles)) as pool:
        return list(pool.map(read, handles))


def unmount(point: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cvmfs_ml", "umount", str(point)],
                          capture_output=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(point)], capture_output=True, timeout=30)


@pytest.mark.parametrize(
    ("source", "soft", "hard"), [("folder", 80, 80), ("folder", 80, 4096), ("http", 80, 80)]
)
def test_many_files_read_at_once_under_a_small_open_file_limit(
    repo: tuple[Path, dict[str, str]],
    tmp_path: Path,
    nginx_factory: Callable[..., Nginx],
    source: str,
    soft: int,
    hard: int,
) -> None:
    """Over HTTP the fetches' sockets count too. Their keep-alive pool is opened early and
    kept, so here the cache files meet the limit first; a socket that cannot be opened is
    ``test_fetcher``'s case (the daemon's own shortage, not a server failure)."""
    folder, digests = repo
    point = tmp_path / "mnt"
    target, extra = str(folder), []
    if source == "http":
        (tmp_path / "www" / "cvmfs").mkdir(parents=True)
        (tmp_path / "www" / "cvmfs" / FQRN).symlink_to(folder)
        target = nginx_factory(tmp_path / "www").repo_url(FQRN)
        extra = ["--key", str(folder.parent.parent / "keys" / f"{FQRN}.pub")]
    pid = mount_under_limit(target, point, tmp_path / "cache", soft, hard, *extra)
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        allowed = int(re.search(r"Max open files\s+(\d+)", limits).group(1))  # type: ignore[union-attr]
        assert allowed == hard  # raised as far as the hard limit lets it
        got = read_all_at_once(point)
        assert got == [digests[name] for name in sorted(digests)]
    finally:
        unmount(point)
    log = (tmp_path / "mnt.log").read_text()
    assert f"only {hard} open files allowed" in log and "ERROR" not in log, log


def test_cvmfs_nfiles_from_the_client_configuration(
    repo: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Upstream's ``CVMFS_NFILES`` sets how far the daemon raises its limit; one below the
    suggested minimum is the site's choice, so no warning about the hard limit."""
    folder, digests = repo
    config = tmp_path / "client.conf"
    config.write_text("CVMFS_NFILES=3000\n")
    point = tmp_path / "mnt"
    pid = mount_under_limit(str(folder), point, tmp_path / "cache", 1024, 4096,
                            "--config", str(config))  # fmt: skip
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert re.search(r"Max open files\s+3000\s+4096\s", limits), limits
        assert hashlib.sha256((point / "s0.bin").read_bytes()).hexdigest() == digests["s0.bin"]
    finally:
        unmount(point)
    assert "open files allowed" not in (tmp_path / "mnt.log").read_text()
