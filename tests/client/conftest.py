"""Fixtures for client tests: FUSE mounts, and the fetcher tests' loopback servers.

``require_fuse`` skips a test when FUSE cannot work here (no pyfuse3, no ``fusermount3``, no
usable ``/dev/fuse``) and fails it in CI (``CI`` set), which must provide FUSE. ``mounter``
mounts at fresh folders and unmounts in teardown whatever happens, lazily if busy. ``origin``,
``servers``, ``closed_port`` and ``clock`` serve the fetcher tests (client/fetcher_servers.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.fetcher_servers import Origin, Server
from cvmfs_ml.client.mounts import MountHandle, is_mounted, mount
from fusecheck import fuse_problem
from waiting import ManualClock


@pytest.fixture(scope="session")
def require_fuse() -> None:
    problem = fuse_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"FUSE tests cannot run: {problem}; CI must provide FUSE")
    pytest.skip(f"FUSE tests skipped: {problem}")


@pytest.fixture
def mounter(tmp_path: Path, require_fuse: None) -> Iterator[Callable[..., MountHandle]]:
    """``mounter(target, **options) -> MountHandle`` at a fresh folder; unmounted afterwards."""
    handles: list[MountHandle] = []
    counter = iter(range(100))

    def start(target: str | Path, **options: object) -> MountHandle:
        point = tmp_path / f"mnt{next(counter)}"
        point.mkdir()
        options.setdefault("cache", tmp_path / f"cache{len(handles)}")
        options.setdefault("log_file", tmp_path / f"fuse{len(handles)}.log")
        options.setdefault("timeout", 60.0)
        handle = mount(str(target), point, **options)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        try:
            handle.unmount(timeout=15)
        finally:
            if is_mounted(handle.mountpoint):
                subprocess.run(["fusermount3", "-uz", str(handle.mountpoint)], check=False)


@pytest.fixture(scope="module")
def origin() -> Iterator[Server]:
    server = Server(Origin)
    yield server
    server.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Per-test servers, closed at the end: append to the list."""
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def closed_port() -> str:
    """An address nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The fetcher's clock: reset delays pass when the test moves it, not with the load."""
    monkeypatch.setattr("cvmfs_ml.client.fetcher.time", fake := ManualClock())
    return fake
