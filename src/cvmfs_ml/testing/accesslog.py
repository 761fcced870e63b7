"""Access logs of the loopback services: records, parsers, and origin counters.

``Nginx.requests()`` and ``Squid.requests()`` give tests what reached the origin or the proxy;
:meth:`~cvmfs_ml.testing.nginx.Nginx.counters` and
:meth:`~cvmfs_ml.testing.squid.Squid.records` give benchmarks the log so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "NGINX_LOG_FORMAT",
    "AccessRecord",
    "OriginCounters",
    "SquidRecord",
    "parse_nginx_access_log",
    "parse_nginx_log",
    "parse_squid_access_log",
    "parse_squid_log",
]


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
