"""Real services (nginx, Squid, docker-registry) on loopback, for benchmarks and tests.

The engine must work with the servers a site really runs, and a benchmark that claims "this is
what loading through CVMFS costs" must use them too, configured as the documentation says. So
both start the real binaries from Debian (``nginx-light``, ``squid``, ``docker-registry``)
instead of mocks or stand-ins. This module is the one implementation: the benchmark harness
imports it, and ``tests/services.py`` re-exports it for the test suite (the installed package
cannot import tests, so the code lives here). Each service:

* picks a free port on 127.0.0.1 (or takes one), checks that nothing answers there yet, writes
  its own configuration, logs and pid file into a private temporary folder and never touches
  the system-wide configuration or ports;
* starts in ``__init__`` and returns only when its port accepts connections, or raises
  :class:`ServiceError` with the service's logs in the message;
* is a context manager; ``stop()`` terminates the process and waits for it, ``close()`` also
  removes the temporary folder the service made itself;
* parses its access log: ``requests()`` (tests: what reached the origin or the proxy, waiting
  for the count a test expects), :meth:`Nginx.counters` and :meth:`Squid.records`
  (benchmarks: the log so far, re-read until it stops growing).

The configuration text comes from the template functions below (:func:`nginx_site_config`,
:func:`squid_config`, :data:`CVMFS_SQUID_POLICY`). ``docs/nginx.conf`` and ``docs/squid.conf``
show users the same settings, and ``tests/storage/test_services.py`` checks that the two agree,
so what the tests and benchmarks exercise is what the documentation recommends.

This module does not import pytest; the fixtures live in ``tests/conftest.py``.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from cvmfs_ml.errors import CvmfsMlError

__all__ = [
    "CVMFS_SQUID_POLICY",
    "LOOPBACK",
    "MotoS3",
    "NGINX_LOG_FORMAT",
    "AccessRecord",
    "DockerRegistry",
    "Nginx",
    "OriginCounters",
    "Service",
    "ServiceError",
    "Squid",
    "SquidRecord",
    "available",
    "find_binary",
    "free_port",
    "nginx_main_config",
    "nginx_site_config",
    "parse_nginx_access_log",
    "parse_nginx_log",
    "parse_squid_access_log",
    "parse_squid_log",
    "registry_config",
    "squid_config",
]

LOOPBACK = "127.0.0.1"

RecordT = TypeVar("RecordT")

# Debian installs nginx and squid in /usr/sbin, which is not on every user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ServiceError(CvmfsMlError, RuntimeError):
    """A service did not start (or stop) as expected; the message carries its logs.

    Also a :class:`RuntimeError`, which it was before it joined the cvmfs-ml hierarchy.
    """


def find_binary(name: str) -> str | None:
    """Return the full path of ``name`` on PATH or in the sbin folders, or None."""
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def available(name: str) -> bool:
    """Whether the service binary ``name`` (nginx, squid, docker-registry) is installed."""
    return find_binary(name) is not None


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free a moment ago.

    Another process may take it before the service binds it; :class:`Service` retries with a new
    port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Access logs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRecord:
    """One request as the origin server (nginx, or cvmfs-ml's own server) logged it.

    ``range`` is the request's ``Range`` header, or None when the request had none.
    """

    method: str
    path: str
    status: int
    bytes: int
    range: str | None = None


@dataclass(frozen=True)
class SquidRecord:
    """One request as Squid logged it (Squid's native log format).

    ``result`` is Squid's result code (``TCP_MISS``, ``TCP_HIT``, ``TCP_MEM_HIT``, ...),
    ``bytes`` what Squid sent to the client including headers, ``hierarchy`` where it came from
    (``HIER_DIRECT/127.0.0.1``, ``HIER_NONE/-``, ``FIRSTUP_PARENT/...``).
    """

    result: str
    status: int
    bytes: int
    method: str
    url: str
    hierarchy: str = "-"

    @property
    def hit(self) -> bool:
        """True when Squid logged a cache hit (``TCP_HIT``, ``TCP_MEM_HIT``, ...)."""
        return "HIT" in self.result and "MISS" not in self.result

    @property
    def contacted_upstream(self) -> bool:
        """False when the answer came from this Squid alone (``HIER_NONE``).

        A request that joins a fetch still under way is logged as ``TCP_MISS`` but with
        ``HIER_NONE``: no second upstream request. This is the timing-proof way to count.
        """
        return not self.hierarchy.startswith("HIER_NONE")

    @property
    def answered_locally(self) -> bool:
        """True when the request cost no upstream request: a cache hit, or a collapsed miss.

        This is what a benchmark's hit ratio counts: with collapsed forwarding, concurrent
        clients asking for the same object cause one origin fetch, whatever Squid logs.
        """
        return self.hit or not self.contacted_upstream


@dataclass(frozen=True)
class OriginCounters:
    """Requests answered and body bytes sent by an origin, from its access log.

    Subtract two snapshots to get what happened in between.
    """

    requests: int = 0
    bytes: int = 0

    def __sub__(self, other: OriginCounters) -> OriginCounters:
        return OriginCounters(self.requests - other.requests, self.bytes - other.bytes)


# The format nginx (docs/nginx.conf) and cvmfs-ml's built-in server write: the request line,
# status, body bytes and the Range header, so tests and operators can see partial requests.
NGINX_LOG_FORMAT = (
    '\'$remote_addr - [$time_iso8601] "$request" $status $body_bytes_sent '
    'range="$http_range" rt=$request_time ua="$http_user_agent"\''
)

_NGINX_LINE = re.compile(
    r'^\S+ - \[[^\]]*\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+)'
    r'(?: range="(?P<range>[^"]*)")?'
)


def parse_nginx_access_log(text: str) -> list[AccessRecord]:
    """Parse lines in :data:`NGINX_LOG_FORMAT`; lines that do not match are skipped."""
    records = []
    for line in text.splitlines():
        match = _NGINX_LINE.match(line)
        if match is None:
            continue
        parts = match["request"].split(" ")
        method = parts[0] if parts and parts[0] else "-"
        path = parts[1] if len(parts) > 1 else "-"
        rng = match["range"]
        records.append(
            AccessRecord(
                method=method,
                path=path,
                status=int(match["status"]),
                bytes=int(match["bytes"]),
                range=None if rng in (None, "-", "") else rng,
            )
        )
    return records


def parse_nginx_log(text: str) -> list[tuple[str, int, int]]:
    """``(path, status, body bytes)`` per line: :func:`parse_nginx_access_log` as tuples."""
    return [(r.path, r.status, r.bytes) for r in parse_nginx_access_log(text)]


def parse_squid_access_log(text: str) -> list[SquidRecord]:
    """Parse Squid's native access log format.

    Fields: time elapsed client result/status bytes method URL user hierarchy type. Entries
    without a request (a client that connected and hung up, like the readiness probe) are left
    out.
    """
    records = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or "/" not in fields[3]:
            continue
        result, _, status = fields[3].partition("/")
        method = fields[5]
        if method == "-" or result.startswith("NONE"):
            continue
        records.append(
            SquidRecord(
                result=result,
                status=int(status) if status.isdigit() else 0,
                bytes=int(fields[4]) if fields[4].isdigit() else 0,
                method=method,
                url=fields[6],
                hierarchy=fields[8] if len(fields) > 8 else "-",
            )
        )
    return records


parse_squid_log = parse_squid_access_log
"""The benchmark harness's name for :func:`parse_squid_access_log`."""


# --------------------------------------------------------------------------------------------
# Configuration templates (kept consistent with docs/nginx.conf and docs/squid.conf)
# --------------------------------------------------------------------------------------------


def nginx_site_config(root: str, listen: str, access_log: str) -> str:
    """The ``log_format`` and ``server`` block of a CVMFS Stratum 0/1 web server.

    ``root`` holds ``cvmfs/<fqrn>/``; only ``/cvmfs/`` is served. The header policy follows
    upstream's Apache configuration (cvmfs-format.md §11): dot files 61 s, immutable ``data/``
    objects three days, no ``Last-Modified``/``ETag``/conditional requests (Squid bugs).
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


# Lines every Squid in front of CVMFS needs, whatever its size. docs/squid.conf contains each of
# them verbatim (a test checks); see the comments there for why each one matters.
CVMFS_SQUID_POLICY: tuple[str, ...] = (
    "collapsed_forwarding on",
    "minimum_expiry_time 0 seconds",
    "range_offset_limit -1",
    "quick_abort_min -1 KB",
)


def squid_config(
    *,
    http_port: str,
    workdir: Path,
    service_user: str | None,
    visible_hostname: str,
    cache_mem_mb: int,
    maximum_object_size_mb: int,
    maximum_object_size_in_memory_mb: int,
    parent: tuple[str, int] | None = None,
) -> str:
    """A memory-only forward proxy for tests, with :data:`CVMFS_SQUID_POLICY`.

    Only localhost may use it. With no ``cache_dir`` Squid caches in memory only, so no
    ``squid -z`` step is needed. ``shutdown_lifetime 0`` makes ``stop()`` fast (the default waits
    30 s for clients). ``parent`` routes every miss through another proxy, like a site Squid
    behind a regional one. ``visible_hostname`` must differ between chained Squids: Squid
    finds its own name in the ``Via`` header and refuses the request as a forwarding loop.
    """
    lines = [
        f"http_port {http_port}",
        f"visible_hostname {visible_hostname}",
        "http_access allow localhost",
        "http_access deny all",
        "",
        f"cache_mem {cache_mem_mb} MB",
        f"maximum_object_size_in_memory {maximum_object_size_in_memory_mb} MB",
        f"maximum_object_size {maximum_object_size_mb} MB",
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
    if service_user:
        lines.append(f"cache_effective_user {service_user}")
    if parent is not None:
        host, port = parent
        lines += [
            f"cache_peer {host} parent {port} 0 no-query no-digest default",
            "never_direct allow all",
        ]
    return "\n".join(lines) + "\n"


def registry_config(*, addr: str, storage: Path) -> str:
    """A docker-registry (distribution 2.x) configuration: filesystem storage, plain HTTP."""
    return f"""\
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: cvmfs-ml-test-only-{uuid.uuid4().hex}
health:
  storagedriver:
    enabled: false
"""


# --------------------------------------------------------------------------------------------
# Service processes
# --------------------------------------------------------------------------------------------


class Service:
    """A server process on loopback with its own folder, started on construction.

    Subclasses set ``binary`` and implement :meth:`_prepare` (write configuration for
    ``self.port``) and :meth:`_command`. ``log_files`` lists what :meth:`logs` shows.
    """

    binary: str = ""
    stop_signal: int = signal.SIGTERM
    start_timeout: float = 20.0
    stop_timeout: float = 10.0

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        path = find_binary(self.binary)
        if path is None:
            raise ServiceError(f"{self.binary} is not installed (not on PATH or in /usr/sbin)")
        self.binary_path = path
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"cvmfs-ml-{self.binary}-"))
            if workdir is None
            else Path(workdir)
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._start(port)
        except BaseException:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    # -- public API --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def log_files(self) -> list[Path]:
        """The files :meth:`logs` shows; subclasses add their own."""
        return [self.workdir / "output.log"]

    def logs(self) -> str:
        """All of the service's logs, each under a header, for error messages."""
        parts = []
        for path in self.log_files:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path} ---\n{text.rstrip()}")
        return "\n".join(parts) if parts else "(no logs written)"

    def terminate(self) -> None:
        """Ask the service to exit without waiting (stop several at once, then ``stop()``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def stop(self) -> None:
        """Terminate the service and wait for it; kill it if it does not exit in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            # Our process started its own session, so its group holds only its own children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=self.stop_timeout)

    def close(self) -> None:
        """Stop the service and remove its folder when the service created that folder."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, workdir={str(self.workdir)!r})"

    # -- subclass hooks ----------------------------------------------------------------------

    def _prepare(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}._prepare")

    def _command(self) -> Sequence[str]:
        raise NotImplementedError(f"{type(self).__name__}._command")

    def _after_stop(self) -> None:
        """Clean-up after the process exited (subclasses)."""

    # -- start-up ----------------------------------------------------------------------------

    def _start(self, port: int | None) -> None:
        """Start on ``port``, or on free ports (three tries if another process grabs one)."""
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.port = port if port is not None else free_port()
            try:
                self._launch()
                return
            except ServiceError as error:
                in_use = "in use" in str(error).lower()
                if not in_use or attempt == attempts - 1:
                    raise

    def _launch(self) -> None:
        # The readiness check only sees that *something* answers on the port, so make sure
        # nothing else does before we start.
        if _port_answers(self.port):
            raise ServiceError(f"{self.binary}: port {self.port} is already in use")
        self._prepare()
        with open(self.workdir / "output.log", "ab") as output:
            self.process = subprocess.Popen(
                list(self._command()),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._after_stop()
                raise ServiceError(
                    f"{self.binary} exited with status {self.process.returncode} while starting "
                    f"on port {self.port}\n{self.logs()}"
                )
            if _port_answers(self.port):
                return
            time.sleep(0.05)
        self.stop()
        self._after_stop()
        raise ServiceError(
            f"{self.binary} did not answer on port {self.port} within {self.start_timeout:.0f} s"
            f"\n{self.logs()}"
        )


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_for_records(
    read: Callable[[], list[RecordT]], expect: int, timeout: float
) -> list[RecordT]:
    """Re-read a log until it holds ``expect`` records or ``timeout`` passes.

    Servers write the log line after the response went out, so a client can be faster than the
    log; waiting for the count the test expects avoids that race without sleeping blindly.
    """
    deadline = time.monotonic() + timeout
    records = read()
    while len(records) < expect and time.monotonic() < deadline:
        time.sleep(0.02)
        records = read()
    return records


def _settled_records(
    read: Callable[[], list[RecordT]], settle: float, tries: int = 40
) -> list[RecordT]:
    """Re-read a log until two reads ``settle`` seconds apart agree (at most ``tries`` reads).

    For callers that do not know how many records to expect (a benchmark counting what a run
    caused): the server logs after the response went out, so the last lines may still come.
    """
    previous = read()
    for _ in range(tries - 1):
        time.sleep(settle)
        now = read()
        if now == previous:
            return now
        previous = now
    return previous


class Nginx(Service):
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
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def log_files(self) -> list[Path]:
        return [*super().log_files, self.workdir / "error.log", self.access_log]

    def repo_url(self, fqrn: str) -> str:
        """The repository URL a client is configured with (``CVMFS_SERVER_URL``)."""
        return f"{self.url}/cvmfs/{fqrn}"

    def requests(self, expect: int = 0, timeout: float = 5.0) -> list[AccessRecord]:
        """The access log as records, after waiting (up to ``timeout``) for ``expect`` of them."""
        return _wait_for_records(
            lambda: parse_nginx_access_log(_read_log(self.access_log)), expect, timeout
        )

    def counters(self, settle: float = 0.05) -> OriginCounters:
        """Requests and body bytes in the access log so far, once the log stopped growing."""
        records = _settled_records(
            lambda: parse_nginx_access_log(_read_log(self.access_log)), settle
        )
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


class Squid(Service):
    """A Squid forward proxy on loopback, memory cache only, tuned like a CVMFS site Squid.

    Use ``url`` as the client's proxy (``CVMFS_HTTP_PROXY``). ``parent`` (another
    :class:`Squid`, or ``(host, port)``) sends every miss through that proxy.

    Squid refuses to run as root, so as root it runs as ``proxy`` (or ``nobody``). Its folder is
    therefore always a fresh folder in the system temp directory that Squid's user owns, never a
    caller-chosen one inside pytest's 0700 temp tree. Each instance gets its own Squid service
    name (``-n``), because Squid names its shared-memory segments after it.
    """

    binary = "squid"
    # Squid's clean shutdown takes two seconds however idle it is (its shutdown timers tick in
    # whole seconds). These proxies hold nothing worth saving: its cache is memory only and its
    # access log is written line by line. So stop() kills it; set SIGTERM for a clean shutdown.
    stop_signal = signal.SIGKILL

    def __init__(
        self,
        parent: Squid | tuple[str, int] | None = None,
        port: int | None = None,
        cache_mem_mb: int = 256,
        maximum_object_size_mb: int = 1024,
    ) -> None:
        self.parent = (LOOPBACK, parent.port) if isinstance(parent, Squid) else parent
        self.cache_mem_mb = cache_mem_mb
        self.maximum_object_size_mb = maximum_object_size_mb
        self.service_name = f"cvmfsml{os.getpid()}x{uuid.uuid4().hex[:8]}"
        self.service_user = _squid_user() if os.geteuid() == 0 else None
        super().__init__(port=port, workdir=None)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "squid.conf"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def log_files(self) -> list[Path]:
        return [*super().log_files, self.workdir / "cache.log", self.access_log]

    def requests(self, expect: int = 0, timeout: float = 5.0) -> list[SquidRecord]:
        """The access log as records, after waiting (up to ``timeout``) for ``expect`` of them."""
        return _wait_for_records(
            lambda: parse_squid_access_log(_read_log(self.access_log)), expect, timeout
        )

    def records(self, settle: float = 0.05) -> list[SquidRecord]:
        """The access log so far as records, once the log stopped growing."""
        return _settled_records(
            lambda: parse_squid_access_log(_read_log(self.access_log)), settle
        )

    def _prepare(self) -> None:
        config = squid_config(
            http_port=f"{LOOPBACK}:{self.port}",
            workdir=self.workdir,
            service_user=self.service_user,
            visible_hostname=self.service_name,
            cache_mem_mb=self.cache_mem_mb,
            maximum_object_size_mb=self.maximum_object_size_mb,
            maximum_object_size_in_memory_mb=min(self.cache_mem_mb, self.maximum_object_size_mb),
            parent=self.parent,
        )
        self.conf_path.write_text(config)
        if self.service_user is not None:
            entry = pwd.getpwnam(self.service_user)
            os.chmod(self.workdir, 0o755)
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _command(self) -> Sequence[str]:
        # -N: stay in the foreground as one process (no daemon, no SMP kids).
        return [self.binary_path, "-N", "-n", self.service_name, "-f", str(self.conf_path)]

    def _after_stop(self) -> None:
        # Squid removes its shared-memory segments on a clean exit; after a crash they would
        # block the next start under the same name. The names contain our unique service name.
        for segment in Path("/dev/shm").glob(f"{self.service_name}-*"):
            with contextlib.suppress(OSError):
                segment.unlink()

    def stop(self) -> None:
        super().stop()
        self._after_stop()


def _squid_user() -> str:
    for name in ("proxy", "squid", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ServiceError("no unprivileged user (proxy, squid, nobody) to run Squid as")


class DockerRegistry(Service):
    """Debian's ``docker-registry`` (distribution 2.x): plain HTTP, filesystem storage.

    ``url`` is the registry's base URL; ``GET {url}/v2/`` answers 200 when it is up. Images are
    stored under ``storage``.
    """

    binary = "docker-registry"

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        super().__init__(port=port, workdir=workdir)

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"{LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        self.storage.mkdir(exist_ok=True)
        self.conf_path.write_text(registry_config(addr=self.host, storage=self.storage))

    def _command(self) -> Sequence[str]:
        return [self.binary_path, "serve", str(self.conf_path)]


class MotoS3(Service):
    """moto's standalone S3 server (``moto_server``, the one s3fs tests against), in memory.

    ``url`` is the S3 endpoint and also the plain-HTTP root clients read buckets from
    (``{url}/BUCKET/KEY``, path-style). :meth:`s3_params` gives upstream's ``CVMFS_S3_*``
    settings for it; any access key is accepted.
    """

    binary = "moto_server"

    def s3_params(self, bucket: str) -> dict[str, str]:
        return {
            "CVMFS_S3_HOST": LOOPBACK,
            "CVMFS_S3_PORT": str(self.port),
            "CVMFS_S3_BUCKET": bucket,
            "CVMFS_S3_ACCESS_KEY": "testing",
            "CVMFS_S3_SECRET_KEY": "testing",
            "CVMFS_S3_DNS_BUCKETS": "false",
        }

    def create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)

    def _prepare(self) -> None:
        pass

    def _command(self) -> Sequence[str]:
        return [self.binary_path, "-H", LOOPBACK, "-p", str(self.port)]


class NotifyingDockerRegistry(DockerRegistry):
    """docker-registry with ``notifications`` sent to ``webhook`` (distribution's config.yml
    ``notifications.endpoints``), each request carrying ``Authorization: Bearer <token>``."""

    def __init__(
        self, webhook: str, token: str, port: int | None = None, workdir: Path | None = None
    ) -> None:
        self.webhook, self.token = webhook, token
        super().__init__(port=port, workdir=workdir)

    def _prepare(self) -> None:
        super()._prepare()
        endpoint = (
            "notifications:\n  endpoints:\n    - name: cvmfs-ml-sync\n"
            f"      url: {self.webhook}\n      headers:\n"
            f"        Authorization: [Bearer {self.token}]\n"
            "      timeout: 2s\n      threshold: 3\n      backoff: 200ms\n"
        )
        self.conf_path.write_text(self.conf_path.read_text() + endpoint)


__all__ += ["NotifyingDockerRegistry"]
