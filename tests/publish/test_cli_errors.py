"""Issue 9, item 5: every CLI failure is one line; a full disk loses nothing and gc relieves it."""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from cvmfs_ml.cli.common import describe_error
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import create_repository
from disks import fill, small_tmpfs

from .test_hostile_ingest import cli


def one_line_failure(result: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["bad name!", "a/b", "../up", "", "-dash.org", "x" * 254, "é.org"])
def test_repo_create_refuses_a_bad_fqrn(tmp_path: Path, name: str) -> None:
    result = cli("repo", "create", str(tmp_path / "srv"), "--fqrn", name)
    one_line_failure(result, "repository name")
    assert not (tmp_path / "srv").exists() or not any((tmp_path / "srv").iterdir())
    assert not (tmp_path / "keys").exists()
    with pytest.raises(ConfigError):
        create_repository(tmp_path / "srv", name)


def test_good_fqrns_pass(tmp_path: Path) -> None:
    for name in ("models.cern.ch", "a", "sft-nightlies.cern.ch", "under_score.x"):
        result = cli("repo", "create", str(tmp_path / name / "srv"), "--fqrn", name)
        assert result.returncode == 0, result.stderr


ERRORS = [
    OSError(errno.ENOSPC, "No space left on device", "/srv/data/ab/cd"),
    PermissionError(errno.EACCES, "Permission denied", "/data/secret.bin"),
    OSError(errno.EADDRINUSE, "Address already in use"),
    OSError(errno.EMFILE, "Too many open files: no socket for http://s1/cvmfs/x/data/ab/cd"),
    sqlite3.OperationalError("database or disk is full"),
    sqlite3.DatabaseError("file is not a database"),
    UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed"),
    UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"),
    tarfile.ReadError("file could not be opened successfully:\n- method gz: ReadError(...)"),
    EOFError("Compressed file ended before the end-of-stream marker was reached"),
    zlib.error("Error -3 while decompressing data: invalid distance too far back"),
    lzma.LZMAError("Corrupt input data"),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
def test_each_known_cause_maps_to_one_line(exc: BaseException) -> None:
    line = describe_error(exc)
    assert line and "\n" not in line
    if "disk is full" in str(exc) or getattr(exc, "errno", 0) == errno.ENOSPC:
        assert "no space left" in line and "gc" in line
    if isinstance(exc, PermissionError):
        assert "/data/secret.bin" in line and "permission" in line.lower()
    if getattr(exc, "errno", 0) == errno.EMFILE:
        assert "http://s1/" in line and "ulimit -n" in line


def test_a_bug_is_not_disguised() -> None:
    assert describe_error(KeyError("x")) is None


@pytest.mark.parametrize("damage", ["not a database", "malformed pages"])
def test_a_damaged_file_cache_is_set_aside_and_the_publish_goes_on(
    tmp_path: Path, damage: str
) -> None:
    """The publisher's ``files.db`` only saves reading unchanged files again: once damaged
    (found when it opens, or at a page read mid-publish), it is moved aside (kept for a
    post-mortem) with one warning, and the publish goes on. Before, every publish of the
    repository failed with "database error: ...". """
    result = cli("repo", "create", str(tmp_path / "srv"), "--fqrn", "db.test")
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "srv" / "db.test"
    src = tmp_path / "src"
    src.mkdir()
    for index in range(300):  # enough rows for the table to span pages past the first
        (src / f"f{index}").write_bytes(f"file {index}\n".encode())
    assert cli("repo", "publish", str(repo), str(src)).returncode == 0
    damaged = tmp_path / "keys" / "db.test.files.db"
    with damaged.open("r+b") as db_file:
        if damage == "not a database":
            db_file.truncate(0)
            db_file.write(b"this is not sqlite" * 100)
        else:  # the header stays: it opens, and a later page read finds the damage
            db_file.seek(4096)
            db_file.write(os.urandom(damaged.stat().st_size - 4096))
    before = damaged.read_bytes()
    for path in src.iterdir():
        os.utime(path)  # changed as far as the cache can tell: each file is looked up
    result = cli("repo", "publish", str(repo), str(src))
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.decode().splitlines() if "damaged" in line]
    assert len(warning) == 1 and "files.db" in warning[0], result.stderr
    aside = list((tmp_path / "keys").glob("db.test.files.db.damaged.*"))
    assert len(aside) == 1 and aside[0].read_bytes() == before
    with sqlite3.connect(damaged) as db:  # a working cache again
        assert db.execute("SELECT count(*) FROM files").fetchone()[0] > 0
    listing = cli("repo", "cat", str(repo), "/f7")
    assert listing.returncode == 0 and listing.stdout == b"file 7\n"


# -- a full disk -------------------------------------------------------------------------------
def test_disk_full_during_publish_and_gc(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        srv = disk / "srv"
        repo = srv / "full.test"
        assert cli("repo", "create", str(srv), "--fqrn", "full.test").returncode == 0
        first = tmp_path / "first"
        first.mkdir()
        (first / "small.txt").write_bytes(b"revision one\n")
        assert cli("repo", "publish", str(repo), str(first)).returncode == 0
        manifest = (repo / ".cvmfspublished").read_bytes()

        big = tmp_path / "big"
        big.mkdir()
        for index in range(6):  # 6 MiB of incompressible data on a 4 MiB disk
            (big / f"part{index}.bin").write_bytes(os.urandom(2**20))
        result = cli("repo", "publish", str(repo), str(big), "--at", "/big")
        one_line_failure(result, "no space left")
        assert (repo / ".cvmfspublished").read_bytes() == manifest
        check = cli("repo", "check", str(repo))
        assert check.returncode == 0, check.stderr

        # gc on a disk with not one byte free: it deletes before it needs any space.
        fill(disk / "filler")
        gc = cli("repo", "gc", str(repo))
        assert gc.returncode == 0, gc.stderr
        assert b"removed" in gc.stdout and not gc.stdout.startswith(b"removed 0 ")
        (disk / "filler").unlink()
        assert (repo / ".cvmfspublished").read_bytes() == manifest
        check = cli("repo", "check", str(repo))
        assert check.returncode == 0, check.stderr
        # And the repository moves on once there is room.
        (big / "part0.bin").write_bytes(b"fits now\n")
        for index in range(1, 6):
            (big / f"part{index}.bin").unlink()
        result = cli("repo", "publish", str(repo), str(big), "--at", "/big")
        assert result.returncode == 0, result.stderr
        cat = cli("repo", "cat", str(repo), "/big/part0.bin")
        assert cat.stdout == b"fits now\n"


# -- permissions ---------------------------------------------------------------------------------
def without_dac_override(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI as root without CAP_DAC_OVERRIDE: permission bits apply, as for any user."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable]
    return subprocess.run([*command, "-m", "cvmfs_ml", *args], capture_output=True, timeout=180)


def test_unreadable_files_and_a_read_only_repository_are_one_line(tmp_path: Path) -> None:
    assert cli("repo", "create", str(tmp_path / "srv"), "--fqrn", "perm.test").returncode == 0
    repo = tmp_path / "srv" / "perm.test"
    before = (repo / ".cvmfspublished").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "readable").write_bytes(b"fine")
    secret = src / "unreadable.bin"
    secret.write_bytes(b"secret")
    secret.chmod(0)
    result = without_dac_override("repo", "publish", str(repo), str(src))
    if result.returncode == 0:
        pytest.skip("dropping CAP_DAC_OVERRIDE had no effect here")
    line = one_line_failure(result, "permission", "unreadable.bin")
    assert "owner" in line
    assert (repo / ".cvmfspublished").read_bytes() == before
    secret.chmod(0o644)
    folders = [repo / "data", *(p for p in (repo / "data").iterdir() if p.is_dir())]
    for folder in folders:  # the objects cannot be written
        folder.chmod(0o555)
    try:
        result = without_dac_override("repo", "publish", str(repo), str(src))
        one_line_failure(result, "permission")
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert (repo / ".cvmfspublished").read_bytes() == before
    assert cli("repo", "check", str(repo)).returncode == 0
