"""``registry serve`` refuses, at start and in one line, arguments that cannot work.

Before, ``--stratum1 /proc/nope`` was accepted and every snapshot after a publish failed in the
log, and two ``--repo`` folders of one FQRN silently served one of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.registry.config import ConfigFile
from cvmfs_ml.registry.service import RegistryService


def _service(tmp_path: Path, repos: list[Path], stratum1: Path | None = None) -> RegistryService:
    return RegistryService(repos, tmp_path / "data", ConfigFile(None), stratum1=stratum1)


def test_a_stratum1_folder_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    repo = create_repository(tmp_path / "srv", "one.test").repo_dir
    with pytest.raises(ConfigError, match="--stratum1 /proc/nope"):
        _service(tmp_path, [repo], Path("/proc/nope")).stop()
    stratum1 = tmp_path / "stratum1"  # made when missing, as the snapshots would
    _service(tmp_path, [repo], stratum1).stop()
    assert stratum1.is_dir()


def test_two_repo_folders_of_one_fqrn_are_refused(tmp_path: Path) -> None:
    first = create_repository(tmp_path / "a", "same.test").repo_dir
    second = create_repository(tmp_path / "b", "same.test", keys_dir=tmp_path / "k").repo_dir
    with pytest.raises(ConfigError, match=r"same\.test") as refused:
        _service(tmp_path, [first, second]).stop()
    assert str(first) in str(refused.value) and str(second) in str(refused.value)
    assert not (tmp_path / "data").exists()  # refused before anything was written


@pytest.mark.parametrize("case", ["stratum1", "fqrn"])
def test_serve_says_so_in_one_line(tmp_path: Path, case: str) -> None:
    repo = create_repository(tmp_path / "a", "same.test").repo_dir
    if case == "stratum1":
        args, expected = ["--repo", str(repo), "--stratum1", "/proc/nope"], "/proc/nope"
    else:
        other = create_repository(tmp_path / "b", "same.test", keys_dir=tmp_path / "k").repo_dir
        args, expected = ["--repo", str(repo), "--repo", str(other)], "same.test"
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "registry", "serve", *args,
         "--data", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cvmfs-ml: ")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """``registry serve --port P`` with P taken printed the start-up notes and then uvicorn's
    log (eight lines, the bind error among them) and exited 3; ``serve`` says it in one line."""
    import socket

    repo = create_repository(tmp_path / "a", "one.test").repo_dir
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cvmfs_ml", "registry", "serve", "--repo", str(repo),
             "--data", str(tmp_path / "data"), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cvmfs-ml: ") and "already in use" in lines[0], lines[0]
    assert "--port" in lines[0]
