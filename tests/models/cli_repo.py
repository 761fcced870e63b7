"""``cvmfs-ml`` run as a user runs it, and a repository holding one good model version: what
the hostile-input tests (test_hostile_metadata.py, test_hostile_folders.py) publish beside, to
check that a refused publish leaves the previous revision intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cli(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m cvmfs_ml ARGS``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def repo_with_good_model(tmp_path: Path, fqrn: str) -> Path:
    """A new repository at ``tmp_path/srv/<fqrn>`` with ``t/good:1`` published (one file)."""
    assert cli("repo", "create", tmp_path / "srv", "--fqrn", fqrn).returncode == 0
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.txt").write_text("hi\n")
    repo = tmp_path / "srv" / fqrn
    done = cli("model", "publish", good, "--repo", repo, "--as", "t/good:1")
    assert done.returncode == 0, done.stderr
    return repo
