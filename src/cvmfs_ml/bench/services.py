"""Real servers for benchmarks: nginx as the origin, Squid as the site proxy, docker-registry.

A benchmark that claims "this is what loading through CVMFS costs" must use the servers a
site runs, configured as the documentation says. The test suite has the same services in
``tests/services.py``, but the installed package cannot import tests, so this module carries a
minimal copy: the *configuration text* is identical (``docs/nginx.conf``, ``docs/squid.conf``;
``tests/bench/test_bench_services.py`` checks that the two copies agree), the process handling
is trimmed to what benchmarks need.

Each service picks a free loopback port, writes its configuration, logs and pid into its own
temporary folder, starts in ``__init__`` (returning when the port answers) and is a context
manager. :meth:`Nginx.counters` and :meth:`Squid.records` read the access logs, which is how
the benchmark counts origin requests and bytes and the proxy hit ratio.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cvmfs_ml.errors import CvmfsMlError

__all__ = [
    "CVMFS_SQUID_POLICY",
    "NGINX_LOG_FORMAT",
    "DockerRegistry",
    "Nginx",
    "OriginCounters",
    "ServiceError",
    "Squid",
    "SquidRecord",
    "available",
    "find_binary",
    "nginx_site_config",
    "parse_nginx_log",
    "parse_squid_log",
]

LOOPBACK = "127.0.0.1"
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ServiceError(CvmfsMlError):
    """A benchmark service did not start; the message carries its logs."""


def find_binary(name: str) -> str | None:
    """Full path of ``name`` on PATH or in the sbin folders (Debian puts nginx there)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def available(name: str) -> bool:
    """Whether the service binary ``name`` (nginx, squid, docker-registry) is installed."""
    return find_binary(name) is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# configuration (identical to tests/services.py and docs/*.conf)

NGINX_LOG_FORMAT = (
    '\'$remote_addr - [$time_iso8601] "$request" $status $body_bytes_sent '
    'range="$http_range" rt=$request_time ua="$http_user_agent"\''
)

CVMFS_SQUID_POLICY: tuple[str, ...] = (
    "collapsed_forwarding on",
    "minimum_expiry_time 0 seconds",
    "range_offset_limit -1",
    "quick_abort_min -1 KB",
)


def nginx_site_config(root: str, listen: str, access_log: str) -> str:
    """The ``server`` block of docs/nginx.conf for ``root`` (holding ``cvmfs/<fqrn>/``)."""
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


def _nginx_main_config(site: str, workdir: Path) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    body = "".join(f"    {line}\n" if line else "\n" for line in site.splitlines())
    return (f"{user}worker_processes 1;\ndaemon off;\npid {workdir / 'nginx.pid'};\n"
            f"error_log {workdir / 'error.log'} info;\n\nevents {{\n    worker_connections 1024;"
            f"\n}}\n\nhttp {{\n{temps}\n{body}}}\n")


def _squid_config(port: int, workdir: Path, user: str | None, name: str, cache_mem_mb: int,
                  max_object_mb: int) -> str:
    lines = [
        f"http_port {LOOPBACK}:{port}",
        f"visible_hostname {name}",
        "http_access allow localhost",
        "http_access deny all",
        "",
        f"cache_mem {cache_mem_mb} MB",
        f"maximum_object_size_in_memory {min(cache_mem_mb, max_object_mb)} MB",
        f"maximum_object_size {max_object_mb} MB",
        *CVMFS_SQUID_POLICY,
        "",
        f"pid_filename {workdir / 'squid.pid'}",
        f"cache_log {workdir / 'cache.log'}",
        f"access_log stdio:{workdir / 'access.log'} squid",
        "cache_store_log none",
        "netdb_filename none",
        "pinger_enable off",
        f"coredump_dir {workdir}",
        "shutdown_lifetime 0 seconds",
    ]
    if user:
        lines.append(f"cache_effective_user {user}")
    return "\n".join(lines) + "\n"


def _registry_config(addr: str, storage: Path) -> str:
    return (f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {storage}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n"
            f"  secret: cvmfs-ml-bench-{uuid.uuid4().hex}\nhealth:\n  storagedriver:\n"
            f"    enabled: false\n")


# --------------------------------------------------------------------------------------------
# access logs


@dataclass(frozen=True)
class OriginCounters:
    """Requests answered and body bytes sent by an origin, from its access log."""

    requests: int = 0
    bytes: int = 0

    def __sub__(self, other: OriginCounters) -> OriginCounters:
        return OriginCounters(self.requests - other.requests, self.bytes - other.bytes)


_NGINX_LINE = re.compile(r'^\S+ - \[[^\]]*\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+)')


def parse_nginx_log(text: str) -> list[tuple[str, int, int]]:
    """``(path, status, body bytes)`` per line of :data:`NGINX_LOG_FORMAT`."""
    out = []
    for line in text.splitlines():
        m = _NGINX_LINE.match(line)
        if m:
            parts = m["request"].split(" ")
            out.append((parts[1] if len(parts) > 1 else "-", int(m["status"]), int(m["bytes"])))
    return out


@dataclass(frozen=True)
class SquidRecord:
    """One line of Squid's native log: result code, bytes sent, URL, where it came from."""

    result: str
    bytes: int
    url: str
    hierarchy: str

    @property
    def hit(self) -> bool:
        """Served from Squid's cache, or joined a fetch under way (collapsed forwarding)."""
        return ("HIT" in self.result and "MISS" not in self.result) or \
            self.hierarchy.startswith("HIER_NONE")


def parse_squid_log(text: str) -> list[SquidRecord]:
    """Records of Squid's native access log (probe connections without a request skipped)."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 7 or "/" not in f[3] or f[5] == "-" or f[3].startswith("NONE"):
            continue
        out.append(SquidRecord(f[3].partition("/")[0], int(f[4]) if f[4].isdigit() else 0,
                               f[6], f[8] if len(f) > 8 else "-"))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------
# processes


class _Service:
    binary = ""
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        path = find_binary(self.binary)
        if path is None:
            raise ServiceError(f"{self.binary} is not installed")
        self.binary_path = path
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cvmfs-ml-bench-{self.binary}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            self._start()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{_read(p)[-4000:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _start(self) -> None:
        for attempt in range(3):
            self.port = _free_port()
            self._prepare()
            with open(self.workdir / "output.log", "ab") as output:
                self.process = subprocess.Popen(
                    self._command(), stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if _port_answers(self.port):
                    return
                time.sleep(0.05)
            self.stop()
            if attempt == 2 or "in use" not in self.logs().lower():
                raise ServiceError(f"{self.binary} did not start on port {self.port}\n"
                                   f"{self.logs()}")

    def stop(self) -> None:
        """Terminate the process (its own session) and wait for it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def close(self) -> None:
        """Stop the service and delete its folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Nginx(_Service):
    """nginx serving ``root/cvmfs/<name>/...`` at ``url/cvmfs/<name>/...`` (docs/nginx.conf)."""

    binary = "nginx"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        super().__init__()

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def _prepare(self) -> None:
        site = nginx_site_config(str(self.root), f"{LOOPBACK}:{self.port}", str(self.access_log))
        (self.workdir / "nginx.conf").write_text(_nginx_main_config(site, self.workdir))

    def _command(self) -> list[str]:
        return [self.binary_path, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"),
                "-e", str(self.workdir / "error.log")]

    def counters(self, settle: float = 0.05) -> OriginCounters:
        """Totals of the access log so far.

        nginx logs a request after the response went out, so a client may finish first: the
        log is re-read until two reads ``settle`` seconds apart agree.
        """
        previous = None
        for _ in range(40):
            records = parse_nginx_log(_read(self.access_log))
            now = OriginCounters(len(records), sum(r[2] for r in records))
            if now == previous:
                return now
            previous = now
            time.sleep(settle)
        return previous or OriginCounters()


class Squid(_Service):
    """A memory-only Squid with :data:`CVMFS_SQUID_POLICY`, loopback clients only.

    As root it runs as ``proxy``/``nobody`` (Squid refuses root). Killed on stop: the memory
    cache holds nothing worth a two-second clean shutdown.
    """

    binary = "squid"
    stop_signal = signal.SIGKILL

    def __init__(self, cache_mem_mb: int = 512, maximum_object_size_mb: int = 4096) -> None:
        self.cache_mem_mb = cache_mem_mb
        self.maximum_object_size_mb = maximum_object_size_mb
        self.name = f"cvmfsmlbench{os.getpid()}x{uuid.uuid4().hex[:8]}"
        self.user = _squid_user() if os.geteuid() == 0 else None
        super().__init__()

    def _prepare(self) -> None:
        (self.workdir / "squid.conf").write_text(_squid_config(
            self.port, self.workdir, self.user, self.name, self.cache_mem_mb,
            self.maximum_object_size_mb))
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.workdir, 0o755)
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _command(self) -> list[str]:
        return [self.binary_path, "-N", "-n", self.name, "-f", str(self.workdir / "squid.conf")]

    def records(self, settle: float = 0.05) -> list[SquidRecord]:
        """The access log so far (re-read until stable, as for nginx)."""
        previous: list[SquidRecord] | None = None
        for _ in range(40):
            now = parse_squid_log(_read(self.workdir / "access.log"))
            if previous is not None and len(now) == len(previous):
                return now
            previous = now
            time.sleep(settle)
        return previous or []

    def stop(self) -> None:
        super().stop()
        for segment in Path("/dev/shm").glob(f"{self.name}-*"):
            with contextlib.suppress(OSError):
                segment.unlink()


def _squid_user() -> str:
    for name in ("proxy", "squid", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServiceError("no unprivileged user to run Squid as")


class DockerRegistry(_Service):
    """Debian's docker-registry on loopback (plain HTTP), the target of the OCI mode."""

    binary = "docker-registry"

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        (self.workdir / "storage").mkdir(exist_ok=True)
        (self.workdir / "config.yml").write_text(
            _registry_config(self.host, self.workdir / "storage"))

    def _command(self) -> Sequence[str]:  # type: ignore[override]
        return [self.binary_path, "serve", str(self.workdir / "config.yml")]
