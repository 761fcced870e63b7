"""A publisher killed with SIGKILL at any point leaves the previous revision intact.

A subprocess publishes a fresh tree (chunked weights, many small files, a nested catalog) and is
killed at a spread of delays covering its whole run: while reading and storing data, while
writing catalogs, around the manifest swap. After each kill the repository must open, be either
the previous or the new revision, pass ``repo check``, and accept the next publish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cvmfs_ml.client.check import check_repository
from cvmfs_ml.client.repository import Repository

PUBLISH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np
    from cvmfs_ml.publish.repository import Publisher

    repo, src, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    (src / "v" / "nested").mkdir(parents=True, exist_ok=True)
    (src / "v" / "nested" / ".cvmfscatalog").write_bytes(b"")
    (src / "v" / "nested" / "weights.bin").write_bytes(rng.bytes(6 * 2**20))
    for i in range(200):
        (src / "v" / f"small-{i}.txt").write_text(f"{seed} {i}\\n" * 20)
    print("ready", flush=True)
    publisher = Publisher.open(repo)
    with publisher.transaction() as txn:
        txn.add_folder(src, f"/run-{seed}")
        txn.commit()
    print("done", flush=True)
    """
)


def run_publisher(repo: Path, src: Path, seed: int, kill_after: float | None) -> bool:
    """Run one publish; kill it ``kill_after`` seconds after its data is ready. True if done."""
    process = subprocess.Popen(
        [sys.executable, "-c", PUBLISH, str(repo), str(src), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    if kill_after is None:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        return "done" in out
    time.sleep(kill_after)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return process.returncode == 0


def verify(publisher_repo: Path, key: Path, allowed: set[int]) -> int:
    with Repository.open(publisher_repo, public_key=key) as repo:
        assert repo.revision in allowed
        report = check_repository(repo)
        assert report.ok, report.problems
        return repo.revision


@pytest.mark.slow
def test_kill_9_at_many_points(make_repo, tmp_path: Path) -> None:
    publisher = make_repo()
    key = publisher.keys.paths.master_public
    started = time.monotonic()
    assert run_publisher(publisher.repo_dir, tmp_path / "src-0", 0, None)
    duration = time.monotonic() - started
    revision = verify(publisher.repo_dir, key, {1})
    delays = [duration * f for f in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    outcomes = []
    for seed, delay in enumerate(delays, start=1):
        run_publisher(publisher.repo_dir, tmp_path / f"src-{seed}", seed, delay)
        new_revision = verify(publisher.repo_dir, key, {revision, revision + 1})
        outcomes.append(new_revision > revision)
        revision = new_revision
    # The next publish after all that violence succeeds and is clean.
    assert run_publisher(publisher.repo_dir, tmp_path / "src-final", 99, None)
    verify(publisher.repo_dir, key, {revision + 1})
    assert not all(outcomes), "no kill landed before the manifest swap"
    leftovers = list((publisher.repo_dir / "data" / "txn").iterdir())
    assert leftovers == []  # the last publish cleaned what the killed ones left
