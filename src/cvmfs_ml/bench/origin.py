"""The HTTP origin in front of a benchmark's repository: nginx where installed, else ours.

One implementation for the suite (:mod:`cvmfs_ml.bench.runner`) and the read benchmark
(:mod:`cvmfs_ml.bench.readbench`): nginx configured as docs/nginx.conf (what a Stratum 1
runs) when Debian's ``nginx-light`` is there, otherwise the built-in
:class:`~cvmfs_ml.storage.http.RepositoryServer`; either way with request and byte counters.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.testing import Nginx, OriginCounters, available

__all__ = ["PLAIN_FOLDERS", "Origin"]

PLAIN_FOLDERS = ("plain", "raw")
"""Folders of ``srv/cvmfs/`` with plain copies of model files (download mode, curl cells)."""


class Origin:
    """Serve ``srv/cvmfs/...`` over HTTP on a free loopback port; ``kind`` is what runs.

    ``prefer``: ``nginx`` (fall back to the built-in server, and say so through ``log``),
    ``builtin``, or ``require-nginx`` (refuse to run without nginx).
    """

    def __init__(self, srv: Path, prefer: str = "nginx",
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.kind = "builtin"
        self._nginx: Any = None
        self._server: Any = None
        if prefer in ("nginx", "require-nginx") and available("nginx"):
            self.kind = "nginx"
        elif prefer == "require-nginx":
            raise ConfigError("nginx is not installed (apt-get install nginx-light)")
        elif prefer == "nginx":
            log("nginx is not installed: using the built-in server as origin")
        if self.kind == "nginx":
            self._nginx = Nginx(srv)
            self.port = self._nginx.port
        else:
            from cvmfs_ml.storage.http import RepositoryServer

            # plain/ and raw/ hold plain copies for the download and curl cells
            self._server = RepositoryServer(srv / "cvmfs", plain_folders=PLAIN_FOLDERS).start()
            self.port = self._server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def counters(self) -> OriginCounters:
        """Requests answered and bytes sent so far (subtract two snapshots)."""
        if self._nginx is not None:
            return self._nginx.counters()
        # The built-in server counts a request after its body is sent: let those under way
        # finish (a condition with a deadline, not a guess at how long logging takes).
        self._server.wait_idle()
        return OriginCounters(self._server.requests, self._server.bytes_sent)

    def describe(self) -> str:
        if self.kind == "nginx":
            version = subprocess.run([self._nginx.binary_path, "-v"], capture_output=True,
                                     text=True, check=False).stderr.strip()
            return f"nginx ({version}, docs/nginx.conf settings)"
        return "cvmfs-ml built-in server (storage.http.RepositoryServer)"

    def close(self) -> None:
        if self._nginx is not None:
            self._nginx.close()
        if self._server is not None:
            self._server.stop()
