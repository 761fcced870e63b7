"""A sync round killed mid-round leaves nothing behind for long.

A round unpacks into a folder of its own under ``--scratch`` (or ``TMPDIR``), removed when the
round ends. A process that cannot unwind (``kill -9``, a second SIGTERM, the OOM killer, a
power cut) left that folder, half an image in it, for ever: every later round made its own and
none looked at what earlier ones had left, so a service restarted now and then filled its
scratch disk. Each round's folder now carries a lock its round holds; the next round removes
the folders whose lock nobody holds (another live round's folder is never touched).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.scratch import round_scratch
from hostile_registry import IMAGE_CONFIG, TAR_GZIP, HostileRegistry, image_manifest
from sync.imagebuild import FQRN, make_layer, published
from waiting import wait_until

pytestmark = pytest.mark.service


def _sync(wishlist: Path, publisher: Publisher, scratch: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "--scratch", str(scratch)]
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfs_ml", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_killed_round_leaves_no_scratch_after_the_next(
    publisher: Publisher, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    with HostileRegistry() as registry:
        first = make_layer([("etc", None), ("etc/os", b"test\n"), ("big", os.urandom(2**20))])
        second = make_layer([("etc", None), ("etc/more", b"more\n")])
        layers = [registry.blob(gzip.compress(data, mtime=0), TAR_GZIP) for data in (first, second)]
        config = registry.blob(json.dumps({"os": "linux"}).encode(), IMAGE_CONFIG)
        registry.manifest("lib/base", "1", image_manifest(config, layers))
        wishlist = tmp_path / "wishlist.yaml"
        wishlist.write_text(
            f"version: 1\ncvmfs_repo: {FQRN}\ninput: ['http://{registry.host}/lib/base:1']\n"
        )
        registry.stalled.add(layers[0]["digest"])  # the round streams half of it, then waits
        process = _sync(wishlist, publisher, scratch)
        try:
            wait_until(
                lambda: registry.asked_for(layers[0]["digest"])
                and any(p.is_file() for p in scratch.rglob("*")),
                60,
                "the round unpacking into its scratch folder",
            )
            process.send_signal(signal.SIGKILL)  # no unwinding: as the OOM killer would
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
        assert any(scratch.iterdir())  # what it left
        registry.stalled.clear()
        registry.release.set()

        process = _sync(wishlist, publisher, scratch)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    with published(publisher) as repo:
        link = repo.readlink(f"/{registry.host}/lib/base:1")
        assert repo.read_bytes(f"/{registry.host}/lib/{link}/etc/more") == b"more\n"
    assert list(scratch.iterdir()) == []


def test_a_live_rounds_scratch_is_never_taken(tmp_path: Path) -> None:
    with round_scratch(tmp_path) as live:
        (live / "layer").write_bytes(b"half an image")
        with round_scratch(tmp_path) as other:  # another round (its lock is held)
            assert other != live
            assert (live / "layer").read_bytes() == b"half an image"
        assert not other.exists()
        assert (live / "layer").exists()
    assert list(tmp_path.iterdir()) == []
