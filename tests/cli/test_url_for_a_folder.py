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


@pytest.mark.parametrize(
    ("args", "label"),
    [
        (["repo", "create", "{cwd}/srv", "--fqrn", "url.test", "--keys", URL], "--keys"),
        (["model", "path", "cvmfs://url.test/ns/m:1", "--cache", URL], "--cache"),
        (["sync", "{wishlist}", "--repo", "{upstream}", "--scratch", URL], "--scratch"),
        (["registry", "serve", "--repo", "{upstream}", "--data", URL, "--port", "0"], "--data"),
        (["bench", "run", "--out", "{cwd}/b", "--work", URL, "--modes", "local"], "--work"),
        (["mount", "{upstream}", "{cwd}", "--cache", URL], "--cache"),
    ],
    ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v,
)
def test_a_url_for_any_local_path_option_is_refused(
    args: list[str], label: str, tmp_path: Path
) -> None:
    """Every option typed as a local path took a URL the same way: ``repo create --keys URL``
    wrote the keys under ``http:/...`` and exited 0, ``sync --scratch URL``, ``bench run --work
    URL`` and ``model path --cache URL`` likewise, ``registry serve --data URL`` started."""
    from cvmfs_ml.publish.repository import create_repository

    upstream = create_repository(tmp_path / "up", "url.test").repo_dir
    wishlist = tmp_path / "wishlist.yaml"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"w")
    wishlist.write_text(f"version: 1\ncvmfs_repo: url.test\ninput: []\nmodels:\n  - source: "
                        f"{tmp_path / 'model'}\n    name: ns/m\n    version: '1'\n")  # fmt: skip
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    values = {"upstream": upstream, "wishlist": wishlist, "cwd": cwd}
    result = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *(a.format(**values) for a in args)],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == f"cvmfs-ml: {URL} is a URL; {label} names a local file or folder"
    assert os.listdir(cwd) == []
