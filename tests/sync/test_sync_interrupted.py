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
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.scratch import round_scratch
from hostile_registry import IMAGE_CONFIG, TAR_GZIP, HostileRegistry, image_manifest
from sync.imagebuild import FQRN, make_layer, published
from waiting import wait_until

pytestmark = pytest.mark.service


def _sync(
    wishlist: Path, publisher: Publisher, scratch: Path, *more: str, stderr: Any = None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = ["sync", str(wishlist), "--repo", str(publisher.repo_dir), "--scratch", str(scratch)]
    args += more
    return subprocess.Popen(
        [sys.executable, "-m", "cvmfs_ml", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr or subprocess.PIPE,
    )


def _kill_mid_unpack(
    process: subprocess.Popen[bytes], registry: HostileRegistry, unpacking: Callable[[], bool]
) -> None:
    """SIGKILL ``process`` (no unwinding: as the OOM killer would) once it is held by the
    registry's stalled blob and ``unpacking()``; then the registry lets go."""
    try:
        wait_until(
            lambda: any(registry.asked_for(d) for d in registry.stalled) and unpacking(),
            60,
            "unpacking into the scratch folder",
        )
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    registry.stalled.clear()
    registry.release.set()


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
        _kill_mid_unpack(process, registry, lambda: any(p.is_file() for p in scratch.rglob("*")))
        assert any(scratch.iterdir())  # what it left

        process = _sync(wishlist, publisher, scratch)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    with published(publisher) as repo:
        link = repo.readlink(f"/{registry.host}/lib/base:1")
        assert repo.read_bytes(f"/{registry.host}/lib/{link}/etc/more") == b"more\n"
    assert list(scratch.iterdir()) == []


def _assert_unwound(
    process: subprocess.Popen[bytes], err: bytes, scratch: Path, publisher: Publisher
) -> None:
    """Ended by SIGTERM, cleanly: no traceback, the round's folder gone, nothing published."""
    assert process.returncode == 128 + signal.SIGTERM, err.decode()
    assert "Traceback" not in err.decode()
    assert list(scratch.iterdir()) == []  # unwound: the round's folder went with it
    assert publisher.manifest().revision == 0


def test_a_live_rounds_scratch_is_never_taken(tmp_path: Path) -> None:
    with round_scratch(tmp_path) as live:
        (live / "layer").write_bytes(b"half an image")
        with round_scratch(tmp_path) as other:  # another round (its lock is held)
            assert other != live
            assert (live / "layer").read_bytes() == b"half an image"
        assert not other.exists()
        assert (live / "layer").exists()
    assert list(tmp_path.iterdir()) == []


def test_what_others_left_in_a_shared_scratch_is_not_touched(tmp_path: Path) -> None:
    """In a shared folder (the default, /tmp) names like a round's may be anyone's: a link
    named like a round folder, with a lock file beside it, is not followed, removed or used
    to change the folder's mode, and another user's folder stays theirs."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "kept").write_bytes(b"x")
    victim_mode = stat.S_IMODE(victim.stat().st_mode)
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "cvmfs-ml-sync.link").symlink_to(victim)
    (shared / "cvmfs-ml-sync.link.lock").write_bytes(b"")
    theirs = shared / "cvmfs-ml-sync.theirs"
    theirs.mkdir()
    (theirs / "their-file").write_bytes(b"y")
    (shared / "cvmfs-ml-sync.theirs.lock").write_bytes(b"")
    if os.geteuid() == 0:  # as root, another user's files are the case that matters
        for path in (theirs, theirs / "their-file", shared / "cvmfs-ml-sync.theirs.lock"):
            os.lchown(path, 65534, 65534)
    with round_scratch(shared) as folder:
        assert folder.is_dir()
    assert (shared / "cvmfs-ml-sync.link").is_symlink()
    assert (victim / "kept").read_bytes() == b"x"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE(victim.stat().st_mode) == victim_mode
    if os.geteuid() == 0:
        assert (theirs / "their-file").read_bytes() == b"y"


def test_a_second_sigterm_stops_a_loop_mid_round(publisher: Publisher, tmp_path: Path) -> None:
    """``sync --loop`` finishes its round on SIGTERM; a second one (as after a service
    manager's patience, or an operator's) did nothing, so a round held by a registry went on
    until the registry let go. It now unwinds at once, as every other command does."""
    scratch = tmp_path / "scratch"
    with HostileRegistry() as registry:
        tar = make_layer([("etc", None), ("big", os.urandom(2**20))])
        layer = registry.blob(gzip.compress(tar, mtime=0), TAR_GZIP)
        config = registry.blob(json.dumps({"os": "linux"}).encode(), IMAGE_CONFIG)
        registry.manifest("lib/base", "1", image_manifest(config, [layer]))
        wishlist = tmp_path / "wishlist.yaml"
        wishlist.write_text(
            f"version: 1\ncvmfs_repo: {FQRN}\ninput: ['http://{registry.host}/lib/base:1']\n"
        )
        registry.stalled.add(layer["digest"])  # held until the test ends (60 s at most)
        log = tmp_path / "stderr"
        with log.open("wb") as stderr:
            process = _sync(
                wishlist, publisher, scratch, "--loop", "--interval", "3600", stderr=stderr
            )
        try:
            wait_until(
                lambda: registry.asked_for(layer["digest"]) and any(scratch.glob("*/images/*")),
                60,
                "the round unpacking into its scratch folder",
            )
            process.send_signal(signal.SIGTERM)
            wait_until(  # (two at once would be one: signals do not queue)
                lambda: b"stopping after this round" in log.read_bytes(), 30, "the first SIGTERM"
            )
            assert process.poll() is None  # it lets the round finish
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)  # not the registry's 60 s
            err = log.read_bytes()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
    _assert_unwound(process, err, scratch, publisher)


_PUSH = """
import sys
from pathlib import Path
from cvmfs_ml.models.sources.oci_client import OciReference, RegistryClient
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.push import publish_image
repo, host, scratch = sys.argv[1:4]
publish_image(Publisher(repo), RegistryClient(host, plain_http=True),
              OciReference(host, "lib/base", "1", None), public_registry="pushed.example",
              scratch=Path(scratch))
"""


def test_a_killed_image_push_leaves_no_scratch_after_the_next(
    publisher: Publisher, tmp_path: Path
) -> None:
    """The same for an image pushed to our registry (``sync/push.py``): a registry server
    killed while it unpacked one left ``cvmfs-ml-push.<random>/`` for ever."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with HostileRegistry() as registry:
        tar = make_layer([("etc", None), ("etc/os", b"pushed\n"), ("big", os.urandom(2**20))])
        layer = registry.blob(gzip.compress(tar, mtime=0), TAR_GZIP)
        config = registry.blob(json.dumps({"os": "linux"}).encode(), IMAGE_CONFIG)
        registry.manifest("lib/base", "1", image_manifest(config, [layer]))
        registry.stalled.add(layer["digest"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        args = [str(publisher.repo_dir), registry.host, str(scratch)]
        process = subprocess.Popen([sys.executable, "-c", _PUSH, *args], env=env)
        _kill_mid_unpack(process, registry, lambda: any(scratch.glob("*/flat")))
        assert any(scratch.iterdir())  # what it left
        done = subprocess.run([sys.executable, "-c", _PUSH, *args], env=env, timeout=120)
    assert done.returncode == 0
    with published(publisher) as repo:
        link = repo.readlink("/pushed.example/lib/base:1")
        assert repo.read_bytes(f"/pushed.example/lib/{link}/etc/os") == b"pushed\n"
    assert list(scratch.iterdir()) == []


_HOLES: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_holes() -> Iterator[None]:
    yield
    while _HOLES:
        _HOLES.pop().close()


def _blackhole() -> str:
    """``host:port`` where a connection never completes: a listener that accepts nothing,
    its queue (of one) already full, so the kernel drops every later SYN (kept to the end)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=10)
    _HOLES.extend([listener, filler])
    host, port = listener.getsockname()
    return f"{host}:{port}"


def _two_layers(
    registry: HostileRegistry, tmp_path: Path, kind: str, hold: str
) -> tuple[Path, str]:
    """An image or a model of two layers, the second one held until the test ends (60 s at
    most) as ``hold`` says: ``stalled``, ``silent``, or ``retried`` (503, Retry-After: an
    hour); the wishlist asking for it, and the second layer's digest."""
    if kind == "image":
        first = make_layer([("etc", None), ("etc/os", b"test\n")])
        second = make_layer([("etc", None), ("big", os.urandom(2**20))])
        datas, media_type = [gzip.compress(d, mtime=0) for d in (first, second)], TAR_GZIP
        config = registry.blob(json.dumps({"os": "linux"}).encode(), IMAGE_CONFIG)
        entry = f"input: ['http://{registry.host}/lib/base:1']\n"
    else:
        datas, media_type = [b"small", os.urandom(2**20)], "application/octet-stream"
        config = registry.blob(b"{}", "application/vnd.oci.empty.v1+json")
        entry = f"models:\n  - source: http://{registry.host}/lib/base:1\n    name: hep/m\n"
    layers = [registry.blob(data, media_type) for data in datas]
    if kind == "model":
        for n, layer in enumerate(layers):
            layer["annotations"] = {"org.opencontainers.image.title": f"w{n}.bin"}
    registry.manifest("lib/base", "1", image_manifest(config, layers))
    wishlist = tmp_path / "wishlist.yaml"
    wishlist.write_text(f"version: 1\ncvmfs_repo: {FQRN}\n{entry}")
    held = layers[1]["digest"]
    if hold == "unreachable":
        registry.redirects[held] = f"http://{_blackhole()}/blob"
    elif hold == "retried":
        registry.bodies[held] = (503, 10)
        registry.retry_after[held] = "3600"
    else:
        getattr(registry, hold).add(held)
    return wishlist, held


@pytest.mark.parametrize("hold", ["stalled", "silent", "retried", "unreachable"])
@pytest.mark.parametrize("kind", ["image", "model"])
def test_sigterm_stops_a_stalled_parallel_download_at_once(
    publisher: Publisher, tmp_path: Path, kind: str, hold: str
) -> None:
    """A layer downloading on a worker thread (an image's first layer streams on the main
    thread; a model's layers all download in parallel) that a registry stalls held a SIGTERM'd
    sync for as long as the registry held the socket (60 s here, the read timeout at most): the
    unwinding waited for the worker's blocked read. The downloads are now cancelled as the
    round unwinds, so the process ends at once, its scratch removed.

    ``silent``: a registry that reads the request and never answers (no status line) held it
    too, after that fix: the cancellation shut down the sockets of the answers it had, and a
    request waiting for its answer had none yet. Its socket is now known while it waits.

    ``retried``: a 503 with ``Retry-After: 3600`` held it as long (urllib3 sleeps up to six
    hours per retry, at most the timeout now): the wait before a retry is cancelled too.

    ``unreachable``: a blob redirected to a host that never completes a connection held it
    15 s per try, four tries: the connection being made is shut down too, and no retry
    follows a cancellation."""
    scratch = tmp_path / "scratch"
    with HostileRegistry() as registry:
        wishlist, held = _two_layers(registry, tmp_path, kind, hold)
        process = _sync(wishlist, publisher, scratch)
        pattern = "*.part-*" if hold == "stalled" else "*"  # the others: no body, no .part
        try:
            wait_until(
                lambda: registry.asked_for(held) and any(scratch.rglob(pattern)),
                60,
                f"a worker thread downloading the {hold} layer",
            )
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=15)  # not the registry's 60 s
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=60)
    _assert_unwound(process, err, scratch, publisher)
    assert err.decode().strip().splitlines() == [  # the one line, and nothing else
        "cvmfs-ml: stopping (SIGTERM): cleaning up what was started"
    ]
