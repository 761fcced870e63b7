"""nginx on loopback, configured as ``docs/nginx.conf`` (a CVMFS Stratum 0/1 web server).

The configuration text comes from :func:`nginx_site_config` inside :func:`nginx_main_config`;
``docs/nginx.conf`` shows users the same settings, and ``tests/storage/test_services.py`` checks
that the two agree, so what the tests and benchmarks exercise is what the documentation
recommends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from cvmfs_ml.testing.accesslog import (
    NGINX_LOG_FORMAT,
    AccessRecord,
    OriginCounters,
    parse_nginx_access_log,
)
from cvmfs_ml.testing.service import LOOPBACK, LoggedService, ServiceError

_MARKER = "/cvmfs-ml-log-marker-"

__all__ = ["Nginx", "nginx_main_config", "nginx_site_config"]


def nginx_site_config(root: str, listen: str, access_log: str) -> str:
    """The ``log_format`` and ``server`` block of a CVMFS Stratum 0/1 web server.

    ``root`` holds ``cvmfs/<fqrn>/``; only ``/cvmfs/`` is served. The header policy follows
    upstream's Apache configuration (cvmfs-format.md §11): dot files 61 s, immutable ``data/``
    objects three days, no ``Last-Modified``/``ETag``/conditional requests (Squid bugs). Key
    material (``*.key``, ``*.masterkey``, ``*.pem``, ``*.crt``, ``*.gw``) and a publisher's
    staging area (``data/txn/``) are never served, like ``cvmfs-ml serve`` does.
    docs/nginx.conf is this text with ``root=/srv``, ``listen=80`` and comments.
    """
    return f"""\
log_format cvmfs {NGINX_LOG_FORMAT};

server {{
    listen {listen};
    server_name _;
    root {root};
    access_log {access_log} cvmfs;

    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 100000;

    gzip off;
    etag off;
    if_modified_since off;
    add_header Last-Modified "";

    location / {{
        return 404;
    }}

    location /cvmfs/ {{
        autoindex off;
        types {{ }}
        default_type application/octet-stream;
        expires 61s;

        location ~* "\\.(key|masterkey|pem|crt|gw)$" {{
            return 404;
        }}

        location ~ "^/cvmfs/[^/]+/data/txn/" {{
            return 404;
        }}

        location ~ "^/cvmfs/[^/]+/data/" {{
            expires 3d;
        }}

        location ~ "^/cvmfs/[^/]+/\\.cvmfs[^/]*$" {{
            default_type application/x-cvmfs;
            expires 61s;
        }}
    }}
}}
"""


def nginx_main_config(site: str, workdir: Path, *, run_as_root: bool) -> str:
    """Wrap a site block into a complete nginx.conf whose files all live in ``workdir``.

    ``daemon off`` keeps the master as our child process; the temp paths point into ``workdir``
    because the compiled-in ones (/var/lib/nginx) may not exist or be writable. As root the
    workers also run as root: test data lives in pytest's 0700 temp folders that ``www-data``
    could not read.
    """
    user = "user root root;\n" if run_as_root else ""
    temps = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    indented_site = "".join(f"    {line}\n" if line else "\n" for line in site.splitlines())
    return f"""\
{user}worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;

events {{
    worker_connections 1024;
}}

http {{
{temps}
{indented_site}}}
"""


class Nginx(LoggedService[AccessRecord]):
    """nginx serving ``root`` at ``http://127.0.0.1:PORT/`` like a CVMFS Stratum 0/1.

    A repository folder ``<root>/cvmfs/<fqrn>/`` is served at ``<url>/cvmfs/<fqrn>``; nothing
    outside ``/cvmfs/`` is served. The configuration is :func:`nginx_site_config` (the one in
    docs/nginx.conf) inside :func:`nginx_main_config`.
    """

    binary = "nginx"

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ServiceError(f"nginx root {self.root} is not a directory")
        super().__init__(port=port, workdir=workdir)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def log_files(self) -> list[Path]:
        return [*super().log_files, self.workdir / "error.log", self.access_log]

    def repo_url(self, fqrn: str) -> str:
        """The repository URL a client is configured with (``CVMFS_SERVER_URL``)."""
        return f"{self.url}/cvmfs/{fqrn}"

    def parse_log(self, text: str) -> list[AccessRecord]:
        return [r for r in parse_nginx_access_log(text) if not r.path.startswith(_MARKER)]

    def requests_so_far(self, timeout: float = 60.0) -> list[AccessRecord]:
        """Every request answered before this call, none missing, markers left out (for
        "nothing more reached the origin" checks; :meth:`log_before_marker`)."""
        marker = f"{_MARKER}{uuid.uuid4().hex}"
        return self.parse_log(self.log_before_marker(marker, marker, timeout))

    def counters(self) -> OriginCounters:
        """Requests answered and body bytes sent so far (:meth:`requests_so_far`: every
        request answered before the call is counted, however late its log line)."""
        records = self.requests_so_far()
        return OriginCounters(len(records), sum(r.bytes for r in records))

    def _prepare(self) -> None:
        site = nginx_site_config(
            root=str(self.root), listen=f"{LOOPBACK}:{self.port}", access_log=str(self.access_log)
        )
        config = nginx_main_config(site, self.workdir, run_as_root=os.geteuid() == 0)
        self.conf_path.write_text(config)

    def _command(self) -> Sequence[str]:
        return [
            self.binary_path,
            "-p",
            str(self.workdir),
            "-c",
            str(self.conf_path),
            "-e",
            str(self.workdir / "error.log"),
        ]
