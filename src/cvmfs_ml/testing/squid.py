"""Squid on loopback, a memory-only forward proxy tuned like a CVMFS site Squid.

:data:`CVMFS_SQUID_POLICY` holds the lines every Squid in front of CVMFS needs;
``docs/squid.conf`` contains each of them verbatim (a test checks).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path

from cvmfs_ml.testing.accesslog import SquidRecord, parse_squid_access_log
from cvmfs_ml.testing.service import LOOPBACK, LoggedService, ServiceError

# A marker URL on a port nothing listens on: Squid answers it at once, with an error, and logs it.
_MARKER = f"http://{LOOPBACK}:9/cvmfs-ml-log-marker-"

__all__ = ["CVMFS_SQUID_POLICY", "Squid", "squid_config"]

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


class Squid(LoggedService[SquidRecord]):
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
    def log_files(self) -> list[Path]:
        return [*super().log_files, self.workdir / "cache.log", self.access_log]

    def parse_log(self, text: str) -> list[SquidRecord]:
        return [r for r in parse_squid_access_log(text) if not r.url.startswith(_MARKER)]

    def records(self, timeout: float = 60.0) -> list[SquidRecord]:
        """Every request answered before this call, none missing, markers left out (a benchmark
        counting what a run cost, a test checking what went through; :meth:`log_before_marker`).
        The marker goes through the proxy in absolute form and gets an error page at once."""
        marker = f"{_MARKER}{uuid.uuid4().hex}"
        text = self.log_before_marker(marker, marker, timeout, {"Host": f"{LOOPBACK}:9"})
        return self.parse_log(text)

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
