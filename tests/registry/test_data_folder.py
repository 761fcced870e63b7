"""The registry's own databases found damaged when it starts.

The queue (``<data>/queue.sqlite``) and the OCI store's index (``<data>/oci/oci.sqlite``) hold
state that nothing else has (jobs waiting, pushed tags), so unlike a cache they are not
started again silently: the registry refuses to start, in one line naming the file, what is
lost by moving it aside, and leaves it as it is. Before, the line was "database error: file is
not a database", which named neither.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import create_repository


@pytest.mark.parametrize(
    ("rel", "lost"), [("queue.sqlite", "jobs"), ("oci/oci.sqlite", "tags")]
)
def test_registry_refuses_a_damaged_database_naming_it(
    tmp_path: Path, rel: str, lost: str
) -> None:
    repo = create_repository(tmp_path / "srv", "damaged.test").repo_dir
    damaged = tmp_path / "data" / rel
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a database, whatever it was" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "registry", "serve", "--repo", str(repo),
         "--data", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cvmfs-ml: ")]
    assert len(lines) == 1 and str(damaged) in lines[0], result.stderr
    assert "damaged" in lines[0] and "move it aside" in lines[0] and lost in lines[0]
    assert "Traceback" not in result.stderr
    assert damaged.read_bytes() == b"not a database, whatever it was" * 64  # left as it was
