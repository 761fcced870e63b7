"""Progress and accounting: bars on a terminal only, new versus reused bytes, what gc freed."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "cvmfs_ml.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def _run_on_terminal(*args: str) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (stdout piped); returns (exit code, terminal text)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=follower, env=env, text=False
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    process.communicate(timeout=60)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def _model(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(np.random.default_rng(seed).bytes(6 * 2**20))
    (folder / "config.json").write_text(json.dumps({"seed": seed}) + "\n")
    return folder


def test_bars_on_a_terminal_only(tmp_path: Path) -> None:
    assert _run("repo", "create", str(tmp_path / "srv"), "--fqrn", "p.test").returncode == 0
    repo = str(tmp_path / "srv" / "p.test")
    src = _model(tmp_path / "m", 1)
    code, terminal = _run_on_terminal("repo", "publish", repo, str(src), "--at", "/a")
    assert code == 0
    assert "publishing" in terminal and "files" in terminal  # the bar was drawn
    piped = _run("repo", "publish", repo, str(src), "--at", "/b")
    assert piped.returncode == 0 and piped.stderr == ""  # nothing drawn into a pipe
    code, terminal = _run_on_terminal("repo", "gc", repo)
    assert code == 0 and "garbage collection" in terminal


def test_model_publish_reports_new_and_reused_bytes(tmp_path: Path) -> None:
    assert _run("repo", "create", str(tmp_path / "srv"), "--fqrn", "m.test").returncode == 0
    repo = str(tmp_path / "srv" / "m.test")
    first = _model(tmp_path / "v1", 2)
    out = _run("model", "publish", str(first), "--repo", repo, "--as", "ns/m:1", "--json")
    assert out.returncode == 0, out.stderr
    one = json.loads(out.stdout)
    assert one["new_bytes"] >= 6 * 2**20 and one["reused_bytes"] == 0
    # Version 2: the same weights, a new config; the weights are found in the repository.
    second = tmp_path / "v2"
    second.mkdir()
    (second / "weights.bin").write_bytes((first / "weights.bin").read_bytes())
    (second / "config.json").write_text('{"seed": "changed"}\n')
    out = _run("model", "publish", str(second), "--repo", repo, "--as", "ns/m:2")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("stored ") and "new, reused 6.3 MB" in line, line


def test_gc_says_what_it_freed_and_which_tags_hold_older_data(tmp_path: Path) -> None:
    assert _run("repo", "create", str(tmp_path / "srv"), "--fqrn", "g.test").returncode == 0
    repo = str(tmp_path / "srv" / "g.test")
    assert (
        _run("repo", "publish", repo, str(_model(tmp_path / "a", 3)), "--at", "/a").returncode == 0
    )
    assert _run("repo", "tag", repo, "keep-a").returncode == 0
    assert _run("repo", "rm", repo, "/a").returncode == 0
    assert (
        _run("repo", "publish", repo, str(_model(tmp_path / "b", 4)), "--at", "/b").returncode == 0
    )
    out = _run("repo", "gc", repo)
    assert out.returncode == 0
    assert out.stdout.startswith("removed ")
    assert "keep-a (r1)" in out.stdout  # the tag that still holds /a's 6 MB
    assert _run("repo", "tag", repo, "-d", "keep-a").returncode == 0
    out = _run("repo", "gc", repo)
    freed = float(out.stdout.split("freeing ")[1].split(" MB")[0])
    assert freed >= 6.0  # /a's weights went (trunk-previous points at the /b revision)
    assert "keep-a" not in out.stdout
    assert _run("repo", "check", repo).returncode == 0
