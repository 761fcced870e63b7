"""Helpers for the registry tests: a real registry server (``cvmfs-ml registry serve`` in a
subprocess, uvicorn on a free loopback port) over two fresh repositories, and HTTP helpers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3

import cvmfs_ml
import waiting
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.registry.config import load_config, save_config
from cvmfs_ml.testing import Service

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))
FQRNS = ("pub1.test", "pub2.test")


class RegistryServer(Service):
    """``python -m cvmfs_ml registry serve`` as a service process."""

    binary = "python3"
    start_timeout = 90.0  # imports take a while on a loaded machine
    stop_timeout = 30.0

    def __init__(self, args: Sequence[str], workdir: Path, port: int | None = None) -> None:
        self.args = list(args)
        super().__init__(port=port, workdir=workdir)

    def _prepare(self) -> None:
        pass

    def _command(self) -> Sequence[str]:
        # This checkout's code, whatever the working folder (PYTHONPATH may be relative).
        src = str(Path(cvmfs_ml.__file__).resolve().parents[1])
        path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
        return ["env", f"PYTHONPATH={path}", sys.executable, "-m", "cvmfs_ml.cli",
                "registry", "serve", *self.args,
                "--port", str(self.port), "--poll", "0.2"]  # fmt: skip

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class RegistryEnv:
    root: Path
    config: Path
    data: Path
    tokens: dict[str, str] = field(default_factory=dict)
    servers: list[RegistryServer] = field(default_factory=list)

    @property
    def repos(self) -> list[Path]:
        return [self.root / fqrn for fqrn in FQRNS]

    def publisher(self, fqrn: str = FQRNS[0]) -> Publisher:
        return Publisher.open(self.root / fqrn)

    def revision(self, fqrn: str = FQRNS[0]) -> int:
        return self.publisher(fqrn).manifest().revision

    def read(self, fqrn: str, path: str) -> bytes:
        publisher = self.publisher(fqrn)
        with Repository.open(
            publisher.repo_dir, public_key=publisher.keys.paths.master_public,
            cache=self.root.parent / f"cache-{fqrn}",
        ) as repo:  # fmt: skip
            return repo.read_bytes(path)

    def set_config(self, **values: Any) -> None:
        data = load_config(self.config).to_json()
        data.update(values)
        from cvmfs_ml.registry.config import RegistryConfig

        save_config(self.config, RegistryConfig.from_json(data))

    def start(self, port: int | None = None, extra: Sequence[str] = ()) -> RegistryServer:
        args = [*extra, *(a for r in self.repos for a in ("--repo", str(r)))]
        args += ["--config", str(self.config), "--data", str(self.data)]
        server = RegistryServer(args, self.root.parent / f"server-{len(self.servers)}", port)
        self.servers.append(server)
        wait_until(lambda: get(server, "/healthz").status == 200, 60, server.logs)
        return server


def wait_until(
    condition: Callable[[], Any], timeout: float, what: Callable[[], str] | str = ""
) -> Any:
    """:func:`waiting.wait_until` where a server not answering yet counts as "not yet"."""
    return waiting.wait_until(
        condition, timeout, what, ignore=(urllib3.exceptions.HTTPError, OSError)
    )


def get(server: Service, path: str, token: str | None = None) -> urllib3.BaseHTTPResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return HTTP.request("GET", server.url + path, headers=headers)


def post(
    server: Service, path: str, body: bytes, token: str | None = None
) -> urllib3.BaseHTTPResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return HTTP.request("POST", server.url + path, body=body, headers=headers)


def text(response: urllib3.BaseHTTPResponse) -> str:
    return response.data.decode()


def job_json(server: Service, job_id: str, token: str | None = None) -> dict[str, Any]:
    return json.loads(get(server, f"/api/v1/jobs/{job_id}", token).data)


def make_tarball(files: dict[str, bytes], *, top: str = "", gz: bool = True) -> bytes:
    """A reproducible tarball of ``files`` (optionally under a ``top`` folder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_body(
    location: str, headers: dict[str, str], length: int, method: str = "PATCH"
) -> socket.socket:
    """A request to ``location`` whose ``length`` body bytes the caller sends (``sendall``)
    when it likes: a client in the middle of its body. Read the reply with ``makefile``."""
    url = urlsplit(location)
    target = f"{url.path}?{url.query}" if url.query else url.path
    conn = socket.create_connection((url.hostname, url.port), timeout=60)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.netloc}",
             "Content-Type: application/octet-stream", f"Content-Length: {length}",
             *(f"{key}: {value}" for key, value in headers.items())]  # fmt: skip
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return conn
