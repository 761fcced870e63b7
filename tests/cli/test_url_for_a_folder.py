"""A URL given where a command writes a local folder is refused in one line.

``Path("http://host/x")`` is ``http:/host/x``: ``bench run --out URL`` ran the whole benchmark
into a folder named ``http:`` under the working folder, ``demo --out URL`` and ``bench sweep``
did the same, and ``replica sync UPSTREAM URL`` made a replica there (exit 0 each time).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

URL = "http://127.0.0.1:9/cvmfs/url.test"


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "run", "--out", URL, "--modes", "local", "--models", "mlp"],
        ["bench", "sweep", "--out", URL, "--size-mib", "1"],
        ["demo", "--out", URL, "--llm-mib", "1"],
        ["replica", "sync", "{upstream}", URL],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_url_for_a_local_folder_is_refused(args: list[str], tmp_path: Path) -> None:
    from cvmfs_ml.publish.repository import create_repository

    upstream = create_repository(tmp_path / "srv", "url.test").repo_dir  # a real one to copy
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *(a.format(upstream=upstream) for a in args)],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"cvmfs-ml: {URL} is a URL; "), lines[0]
    assert "local folder" in lines[0], lines[0]
    assert os.listdir(cwd) == []
