"""HTTP downloads with upstream's host and proxy failover (cvmfs-format.md §10.4, §10.5).

One :class:`Fetcher` serves a whole client: it is thread-safe, keeps keep-alive connection pools
(one ``urllib3`` pool manager for DIRECT and one per proxy, each sized for the prefetch
concurrency) and shares the failover state between threads, as upstream's download manager does:
when one request finds a proxy or host broken, the following requests start from the next one.

Every body is checked while it streams: the hash runs over the raw received bytes (the object
name is the hash of the stored, usually compressed, bytes: §5), then the bytes are inflated into
the sink. Memory stays bounded by the 1 MiB read buffer (plus zlib's window), so a multi-GB
object never sits in memory when :meth:`Fetcher.fetch_into` is used.

Failure rules (download.cc ``CallbackCurlHeader`` and ``VerifyAndFinalize``):

* 2xx is success; redirects are followed only with ``follow_redirects`` (otherwise a host error).
* 400, 404 and 5xx are host failures: switch to the next server URL. With a proxy, an
  ``X-Squid-Error`` or ``Proxy-Status: ...error=`` header makes them proxy failures.
* 429 and connection problems (refused, reset, timeout) are transfer errors: retried on the same
  path after an exponential backoff while the per-fetch retry budget (``max_retries``) lasts, then
  a failure of the proxy (or of the host when DIRECT).
* Any other non-2xx answer through a proxy is a proxy failure (DIRECT: a host failure).
* A body beyond the caller's ``max_bytes`` (announced, received, or once inflated: a zlib bomb
  stops one byte past it) is bad data, refused while it streams, before the sink keeps it.
* A transfer slower than ``low_speed_limit`` bytes/s over one timeout (upstream's
  ``CVMFS_LOW_SPEED_LIMIT``, curl's low-speed rule) is a transfer error: a trickling proxy or
  server is left for the next one. Reads return after each receive so the rate is always seen.
* Data that fails the hash, the zlib decoder or the announced length is fetched once more on the
  same path with ``Cache-Control: no-cache`` and ``Pragma: no-cache``; a second bad body is a
  failure of that proxy (of the host when DIRECT). Upstream makes it a host failure even through
  a proxy; blaming the proxy first means one corrupting cache does not take a good Stratum 1
  out of rotation, and a host that really serves bad bytes still fails once all proxies have.
* A proxy failure moves to the next proxy of the group, then to the next group. When every proxy
  has failed for one host, that is a host failure and the next host is tried through all proxies.
* When nothing works, :class:`~cvmfs_ml.errors.DownloadError` lists every ``(url, proxy, reason)``.
"""

from __future__ import annotations

import enum
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

from cvmfs_ml import __version__
from cvmfs_ml.client.config import DIRECT, ClientConfig
from cvmfs_ml.cvmfs.hashing import Digest, new_hasher
from cvmfs_ml.cvmfs.objects import Decompressor, stored_bound
from cvmfs_ml.errors import ConfigError, DownloadError, FormatError

if TYPE_CHECKING:
    from cvmfs_ml.cvmfs.hashing import Hasher

__all__ = ["DIRECT", "PIECE_SIZE", "FetchStats", "Fetcher"]

log = logging.getLogger(__name__)

PIECE_SIZE = 1 << 20
"""Bytes read from the socket at a time: large enough for 5+ GB/s, small enough to stay cached."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 4  # upstream: "follow up to 4 HTTP redirects"


class _Kind(enum.Enum):
    """What a failed try says about where to go next (upstream ``Failures``, simplified)."""

    PROXY = "proxy"  # switch proxy now
    HOST = "host"  # switch host now
    PROXY_TRANSFER = "proxy transfer"  # back off and retry, then switch proxy
    HOST_TRANSFER = "host transfer"  # back off and retry, then switch host
    BAD_DATA = "bad data"  # retry once with no-cache, then blame the path


class _Failure(Exception):
    def __init__(self, kind: _Kind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


@dataclass(frozen=True, slots=True)
class FetchStats:
    """Counters since the fetcher was created; subtract two snapshots to measure an interval."""

    fetches: int = 0  # successful fetch / fetch_into calls
    requests: int = 0  # HTTP requests sent, retries included
    bytes_received: int = 0  # raw body bytes read from the network
    failovers: int = 0  # switches to another proxy or host
    retries: int = 0  # same-path retries (backoff or no-cache)
    bad_data: int = 0  # bodies that failed the hash, the length or the decoder

    def __sub__(self, other: FetchStats) -> FetchStats:
        return FetchStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys((f.name for f in fields(FetchStats)), 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> FetchStats:
        with self._lock:
            return FetchStats(**self._values)


class _MemorySink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    def reset(self) -> None:
        self.parts.clear()

    def value(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class _FileSink:
    """Writes into the caller's file; rewinds it when a try has to start over."""

    def __init__(self, fileobj: _Sink) -> None:
        self._file = fileobj
        self._seekable = bool(getattr(fileobj, "seekable", lambda: False)())
        self._start = fileobj.tell() if self._seekable else 0  # type: ignore[attr-defined]
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self.written += len(data)

    def reset(self) -> None:
        if self.written == 0:
            return
        if not self._seekable:
            raise OSError("the output cannot be rewound for a retry (not seekable)")
        self._file.seek(self._start)  # type: ignore[attr-defined]
        self._file.truncate()  # type: ignore[attr-defined]
        self.written = 0


@dataclass
class _Job:
    """One fetch: what to get and how to check it, plus upstream's ``JobInfo`` retry state."""

    what: str
    expected: Digest | None
    compressed: bool
    sink: _Sink
    reset: Callable[[], None]
    nocache: bool
    retries_left: int
    max_bytes: int | None = None  # content bound (inflated); the raw body is bounded to match
    backoff: float = 0.0
    attempts: list[tuple[str, str, str]] = field(default_factory=list)
    byte_range: tuple[int, int] | None = None  # [first, last] byte of an HTTP Range request


class Fetcher:
    """Fetches repository paths from a chain of servers through a chain of proxy groups.

    ``server_urls`` are repository base URLs (``http://host/cvmfs/<fqrn>``); ``proxy_groups`` is
    upstream's ``CVMFS_HTTP_PROXY`` as parsed by :func:`cvmfs_ml.client.config.parse_proxy_list`
    (``[["DIRECT"]]`` for none). ``timeout`` applies through a proxy, ``timeout_direct`` without
    one; both bound the connect and every read. ``low_speed_limit`` (bytes/s, upstream's
    ``CVMFS_LOW_SPEED_LIMIT``) fails a transfer whose rate stays below it for that timeout, as
    curl's ``CURLOPT_LOW_SPEED_LIMIT``/``_TIME`` do for upstream; 0 disables it. ``pool_size``
    is the number of keep-alive connections kept per server (and per proxy): set it to the
    prefetch concurrency.
    """

    has_proxy_caches = True
    """Root files may be stale in a proxy: ``nocache`` asks for a fresh copy."""

    def __init__(
        self,
        server_urls: Sequence[str],
        proxy_groups: Sequence[Sequence[str]] = ((DIRECT,),),
        *,
        timeout: float = 5.0,
        timeout_direct: float = 10.0,
        low_speed_limit: int = 1024,
        max_retries: int = 1,
        backoff_init: float = 2.0,
        backoff_max: float = 10.0,
        follow_redirects: bool = False,
        pool_size: int = 8,
        proxy_reset_after: float = 300.0,
        host_reset_after: float = 1800.0,
        user_agent: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._hosts = [u.rstrip("/") for u in server_urls if u.strip()]
        if not self._hosts:
            raise ConfigError("CVMFS_SERVER_URL: no server URL to fetch from")
        self._rng = rng or random.Random()
        self._groups = [list(_with_scheme(p) for p in g) for g in proxy_groups if g]
        if not self._groups:
            self._groups = [[DIRECT]]
        for group in self._groups:
            # upstream picks the first proxy of a group at random and keeps it (load balance)
            self._rng.shuffle(group)
        self.timeout = timeout
        self.timeout_direct = timeout_direct
        self.low_speed_limit = max(0, int(low_speed_limit))
        self.max_retries = max_retries
        self.backoff_init = backoff_init
        self.backoff_max = backoff_max
        self.follow_redirects = follow_redirects
        self.proxy_reset_after = proxy_reset_after
        self.host_reset_after = host_reset_after
        self._pool_size = max(1, pool_size)
        self._headers = {
            "User-Agent": user_agent or f"cvmfs-ml {__version__}",
            "Connection": "Keep-Alive",
        }
        self._lock = threading.Lock()
        self._host_current = 0
        self._host_switched_at = 0.0
        self._group_current = 0
        self._group_burned = 0
        self._group_switched_at = 0.0
        self._managers: dict[str, urllib3.PoolManager] = {}
        self._counters = _Counters()
        self._local = threading.local()
        if follow_redirects:
            self._retries: urllib3.Retry | bool = urllib3.Retry(
                total=None, connect=0, read=0, status=0, other=0,
                redirect=_MAX_REDIRECTS, raise_on_redirect=False, raise_on_status=False,
            )  # fmt: skip
        else:
            self._retries = False

    @classmethod
    def from_config(cls, config: ClientConfig, **overrides: object) -> Fetcher:
        """A fetcher with the hosts, proxies, timeouts and retries of ``config``."""
        kwargs: dict[str, object] = {
            "timeout": config.timeout,
            "timeout_direct": config.timeout_direct,
            "low_speed_limit": config.low_speed_limit,
            "max_retries": config.max_retries,
            "backoff_init": config.backoff_init,
            "backoff_max": config.backoff_max,
            "follow_redirects": config.follow_redirects,
            "pool_size": config.parallel,
            "proxy_reset_after": config.proxy_reset_after,
            "host_reset_after": config.host_reset_after,
        }
        kwargs.update(overrides)
        return cls(config.server_urls, config.proxy_groups, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ public API

    @property
    def hosts(self) -> list[str]:
        """The server URLs, in configured order."""
        return list(self._hosts)

    @property
    def current_host(self) -> str:
        """The server the next fetch starts with (it moves on host failover)."""
        with self._lock:
            self._maybe_reset(time.monotonic())
            return self._hosts[self._host_current]

    @property
    def proxy_groups(self) -> list[list[str]]:
        """The proxy chain; each group's first entry is the proxy currently in use."""
        with self._lock:
            return [list(g) for g in self._groups]

    @property
    def stats(self) -> FetchStats:
        """A snapshot of the counters."""
        return self._counters.snapshot()

    def fetch(
        self,
        rel_path: str,
        expected: Digest | None = None,
        *,
        compressed: bool,
        sink: BinaryIO | None = None,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> bytes:
        """Fetch ``<host>/<rel_path>``, check its hash, inflate it if ``compressed``.

        ``rel_path`` is relative to the repository URL (``data/ab/cd...C``, ``.cvmfspublished``).
        ``expected`` is the object name; ``None`` skips the hash (manifest, whitelist: those are
        signed instead). With ``sink`` the content streams into that file, as
        :meth:`fetch_into`, and ``b""`` is returned. ``nocache`` asks proxies for a fresh copy
        from the first try (useful for the manifest). ``max_bytes`` bounds the content: a body
        (or its inflation) beyond it is refused while it streams, as bad data.
        """
        if sink is not None:
            self.fetch_into(
                rel_path, expected, compressed, sink, nocache=nocache, max_bytes=max_bytes
            )
            return b""
        memory = _MemorySink()
        self._run(rel_path, expected, compressed, memory, memory.reset, nocache,
                  max_bytes=max_bytes)
        return memory.value()

    def fetch_into(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        fileobj: BinaryIO | _Sink,
        *,
        nocache: bool = False,
        byte_range: tuple[int, int] | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Stream the (verified, inflated) content into ``fileobj``; return the bytes written.

        Content is written before the hash over the whole body is known; when a try fails, the
        file is rewound to where it started and truncated, so ``fileobj`` must be seekable for
        retries to work (:meth:`cvmfs_ml.client.cache.ObjectCache.put_stream` gives such a file).
        On :class:`~cvmfs_ml.errors.DownloadError` the file holds no trusted data. Content
        beyond ``max_bytes`` is refused before it is written. ``byte_range=(first, last)`` asks
        for those bytes only (HTTP ``Range``, as upstream fetches chunks of external files); a
        server that answers with the whole file fails.
        """
        sink = _FileSink(fileobj)
        self._run(rel_path, expected, compressed, sink, sink.reset, nocache,
                  byte_range=byte_range, max_bytes=max_bytes)
        return sink.written

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        for manager in managers:
            manager.clear()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ failover loop

    def _run(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        sink: _Sink,
        reset: Callable[[], None],
        nocache: bool,
        *,
        byte_range: tuple[int, int] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        rel = _clean_rel_path(rel_path)
        job = _Job(rel, expected, compressed, sink, reset, nocache, self.max_retries, max_bytes)
        job.byte_range = byte_range
        for n_host, host_index in enumerate(self._host_order()):
            url = f"{self._hosts[host_index]}/{rel}"
            if n_host:
                self._counters.add("failovers")
            for n_proxy, proxy in enumerate(self._proxy_order()):
                if n_proxy:
                    self._counters.add("failovers")
                outcome = self._try_path(job, url, proxy)
                if outcome is None:
                    self._counters.add("fetches")
                    return
                if outcome is _Kind.HOST:
                    log.info("host %s failed for %s, trying the next host", url, rel)
                    self._host_failed(host_index)
                    break
                log.info("proxy %s failed for %s, trying the next proxy", proxy, url)
                self._proxy_failed(proxy)
            else:
                # every proxy failed: upstream's kFailHostAfterProxy
                self._host_failed(host_index)
        raise DownloadError(rel, job.attempts)

    def _try_path(self, job: _Job, url: str, proxy: str) -> _Kind | None:
        """Fetch one URL through one proxy, retrying the same path as upstream allows."""
        nocache = job.nocache
        while True:
            try:
                job.reset()
            except OSError as exc:
                raise DownloadError(job.what, [*job.attempts, (url, proxy, str(exc))]) from exc
            try:
                self._transfer(job, url, proxy, nocache)
                return None
            except _Failure as failure:
                note = " (no-cache)" if nocache else ""
                job.attempts.append((url, proxy, failure.reason + note))
                log.debug("%s via %s: %s%s", url, proxy, failure.reason, note)
                kind = failure.kind
            if kind is _Kind.BAD_DATA:
                self._counters.add("bad_data")
                if not nocache:
                    nocache = True
                    self._counters.add("retries")
                    continue
                return _Kind.PROXY if proxy != DIRECT else _Kind.HOST
            if kind in (_Kind.PROXY_TRANSFER, _Kind.HOST_TRANSFER):
                if job.retries_left > 0:
                    job.retries_left -= 1
                    self._counters.add("retries")
                    self._backoff(job)
                    continue
                return _Kind.PROXY if kind is _Kind.PROXY_TRANSFER else _Kind.HOST
            return kind

    def _backoff(self, job: _Job) -> None:
        """Sleep before a same-path retry: random up to ``backoff_init``, then doubling."""
        if job.backoff == 0.0:
            job.backoff = self._rng.uniform(0.0, self.backoff_init)
        else:
            job.backoff *= 2
        job.backoff = min(job.backoff, self.backoff_max)
        if job.backoff > 0:
            time.sleep(job.backoff)

    # ------------------------------------------------------------------ one HTTP request

    def _transfer(self, job: _Job, url: str, proxy: str, nocache: bool) -> None:
        transfer = _Kind.PROXY_TRANSFER if proxy != DIRECT else _Kind.HOST_TRANSFER
        headers = dict(self._headers)
        if nocache:
            headers["Pragma"] = "no-cache"
            headers["Cache-Control"] = "no-cache"
        if job.byte_range is not None:
            headers["Range"] = f"bytes={job.byte_range[0]}-{job.byte_range[1]}"
        seconds = self.timeout if proxy != DIRECT else self.timeout_direct
        self._counters.add("requests")
        try:
            response = self._manager(proxy).urlopen(
                "GET",
                url,
                headers=headers,
                retries=self._retries,
                redirect=self.follow_redirects,
                preload_content=False,
                decode_content=False,
                timeout=urllib3.Timeout(connect=seconds, read=seconds),
            )
        except MaxRetryError as exc:
            raise _Failure(transfer, _describe(exc.reason or exc)) from exc
        except (Urllib3Error, OSError, http.client.HTTPException) as exc:
            raise _Failure(transfer, _describe(exc)) from exc
        try:
            _check_status(response, proxy)
            if job.byte_range is not None and response.status != 206:
                raise _Failure(_Kind.HOST, f"HTTP {response.status}: the server ignored Range")
            self._read_body(response, transfer, job, seconds)
        finally:
            _finish(response)

    def _read_body(
        self, response: urllib3.BaseHTTPResponse, transfer: _Kind, job: _Job, seconds: float
    ) -> None:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        expected, sink = job.expected, job.sink
        raw_limit = None if job.max_bytes is None else stored_bound(job.max_bytes, job.compressed)
        if raw_limit is not None and length is not None and length > raw_limit:
            raise _Failure(_Kind.BAD_DATA, f"announces {length} bytes, more than {raw_limit}")
        hasher: Hasher | None = new_hasher(expected.algorithm) if expected else None
        inflater = Decompressor(job.what, max_output=job.max_bytes) if job.compressed else None
        view = self._buffer()
        readinto = _readinto_for(response)
        speed = _SpeedCheck(self.low_speed_limit, seconds)
        total = 0
        try:
            while True:
                room = view if raw_limit is None else view[: max(1, raw_limit - total + 1)]
                try:
                    n = readinto(room)
                except (TimeoutError, ReadTimeoutError) as exc:
                    raise _Failure(transfer, f"read timed out after {total} bytes") from exc
                except (ProtocolError, OSError, http.client.HTTPException, Urllib3Error) as exc:
                    raise _Failure(
                        _Kind.BAD_DATA, f"truncated after {total} bytes: {_describe(exc)}"
                    ) from exc
                if not n:
                    break
                piece = view[:n]
                total += n
                if raw_limit is not None and total > raw_limit:
                    raise _Failure(_Kind.BAD_DATA, f"larger than {raw_limit} bytes")
                slow = speed.after(n)
                if slow:
                    raise _Failure(transfer, slow)
                if hasher is not None:
                    hasher.update(piece)
                if inflater is None:
                    sink.write(piece)
                    continue
                try:
                    for out in inflater.pieces(piece):
                        sink.write(out)
                except FormatError as exc:
                    raise _Failure(_Kind.BAD_DATA, exc.reason) from exc
        finally:
            self._counters.add("bytes_received", total)
        if length is not None and total != length:
            raise _Failure(_Kind.BAD_DATA, f"truncated: {total} of {length} bytes")
        if hasher is not None and expected is not None:
            got = Digest(expected.algorithm, hasher.digest())
            if got != expected:
                raise _Failure(_Kind.BAD_DATA, f"hash mismatch: got {got.hex}")
        if inflater is not None:
            try:
                tail = inflater.flush()
            except FormatError as exc:
                raise _Failure(_Kind.BAD_DATA, exc.reason) from exc
            if tail:
                sink.write(tail)

    def _buffer(self) -> memoryview:
        """This thread's reusable read buffer (reads land here, never in fresh memory)."""
        view = getattr(self._local, "view", None)
        if view is None:
            view = memoryview(bytearray(PIECE_SIZE))
            self._local.view = view
        return view

    def _manager(self, proxy: str) -> urllib3.PoolManager:
        with self._lock:
            manager = self._managers.get(proxy)
            if manager is None:
                options = {
                    "num_pools": max(10, 2 * len(self._hosts)),
                    "maxsize": self._pool_size,
                    "block": False,
                }
                if proxy == DIRECT:
                    manager = urllib3.PoolManager(**options)
                else:
                    manager = urllib3.ProxyManager(proxy, **options)
                self._managers[proxy] = manager
            return manager

    # ------------------------------------------------------------------ shared failover state

    def _maybe_reset(self, now: float) -> None:
        """Go back to the first host / proxy group after the reset delays (lock held)."""
        if (
            self._group_current
            and self.proxy_reset_after > 0
            and now - self._group_switched_at >= self.proxy_reset_after
        ):
            log.info("proxy reset: back to the first proxy group")
            self._group_current = 0
            self._group_burned = 0
        if (
            self._host_current
            and self.host_reset_after > 0
            and now - self._host_switched_at >= self.host_reset_after
        ):
            log.info("host reset: back to %s", self._hosts[0])
            self._host_current = 0

    def _host_order(self) -> list[int]:
        with self._lock:
            self._maybe_reset(time.monotonic())
            start, n = self._host_current, len(self._hosts)
        return [(start + k) % n for k in range(n)]

    def _proxy_order(self) -> list[str]:
        with self._lock:
            self._maybe_reset(time.monotonic())
            n = len(self._groups)
            order: list[str] = []
            for k in range(n):
                order.extend(self._groups[(self._group_current + k) % n])
        return order

    def _host_failed(self, index: int) -> None:
        with self._lock:
            if index != self._host_current or len(self._hosts) < 2:
                return  # another thread already moved on
            self._host_current = (index + 1) % len(self._hosts)
            self._host_switched_at = time.monotonic()

    def _proxy_failed(self, proxy: str) -> None:
        """Move the failed proxy to the back of its group; a burned-out group passes the turn."""
        with self._lock:
            group = self._groups[self._group_current]
            if group[0] != proxy:
                return  # not the current proxy (already switched, or a later group)
            self._group_burned += 1
            if len(group) > 1:
                group.append(group.pop(0))
            if self._group_burned >= len(group) and len(self._groups) > 1:
                self._group_current = (self._group_current + 1) % len(self._groups)
                self._group_burned = 0
                self._group_switched_at = time.monotonic()


# ---------------------------------------------------------------------- helpers


class _SpeedCheck:
    """curl's low-speed rule: fail when a ``seconds`` window moves fewer than ``limit * seconds``
    bytes (upstream sets ``CURLOPT_LOW_SPEED_TIME`` to the timeout)."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = max(seconds, 0.001)
        self.start = time.monotonic()
        self.moved = 0

    def after(self, n: int) -> str | None:
        """Count ``n`` bytes; the reason to give up, or None."""
        if not self.limit:
            return None
        self.moved += n
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed < self.seconds:
            return None
        if self.moved < self.limit * elapsed:
            return (
                f"slower than CVMFS_LOW_SPEED_LIMIT={self.limit} B/s "
                f"({self.moved} bytes in {elapsed:.1f} s)"
            )
        self.start, self.moved = now, 0
        return None


def _with_scheme(proxy: str) -> str:
    proxy = proxy.strip()
    if proxy.upper() == DIRECT:
        return DIRECT
    return proxy if "://" in proxy else "http://" + proxy


def _clean_rel_path(rel_path: str) -> str:
    rel = rel_path.lstrip("/")
    if not rel or "://" in rel or any(part in ("..", ".") for part in rel.split("/")):
        raise ValueError(f"not a repository-relative path: {rel_path!r}")
    return rel


def _check_status(response: urllib3.BaseHTTPResponse, proxy: str) -> None:
    """Map the status line to upstream's failure classes (download.cc CallbackCurlHeader)."""
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status}"
    if status in _REDIRECTS:
        raise _Failure(_Kind.HOST, f"{reason} redirect not followed (CVMFS_FOLLOW_REDIRECTS)")
    if status == 429:
        raise _Failure(_Kind.HOST_TRANSFER, f"{reason} (throttled)")
    if status // 100 == 5 or status in (400, 404):
        if proxy != DIRECT and _proxy_says_error(response):
            raise _Failure(_Kind.PROXY, f"{reason} from the proxy")
        raise _Failure(_Kind.HOST, reason)
    raise _Failure(_Kind.PROXY if proxy != DIRECT else _Kind.HOST, reason)


def _proxy_says_error(response: urllib3.BaseHTTPResponse) -> bool:
    if response.headers.get("X-Squid-Error"):
        return True
    return "error=" in response.headers.get("Proxy-Status", "")


def _readinto_for(response: urllib3.BaseHTTPResponse) -> Callable[[memoryview], int]:
    """The fastest way to read this body into a caller's buffer.

    ``urllib3``'s own ``readinto`` reads into a fresh ``bytes`` and copies. When the body is the
    plain ``http.client`` response underneath (no content decoding asked for), reading straight
    into our buffer skips that copy; :func:`_finish` then hands the connection back to the pool.
    """
    raw = getattr(response, "_fp", None)
    if isinstance(raw, http.client.HTTPResponse) and raw.chunked:
        # http.client fills a whole chunk per readinto; read1 returns after one receive
        chunked = raw

        def read_some(view: memoryview) -> int:
            data = chunked.read1(len(view))
            view[: len(data)] = data
            return len(data)

        return read_some
    if isinstance(raw, http.client.HTTPResponse):
        fp = raw.fp
        if fp is not None and not isinstance(fp, _OneReceive) and hasattr(fp, "readinto1"):
            raw.fp = _OneReceive(fp)
        return raw.readinto

    def copy_read(view: memoryview) -> int:
        data = response.read(len(view), decode_content=False)
        view[: len(data)] = data
        return len(data)

    return copy_read


class _OneReceive:
    """The response's socket file, with ``readinto`` returning after one receive.

    A buffered ``readinto`` waits until the whole buffer is full: a server trickling one byte a
    second would keep it waiting for days without ever tripping the socket timeout, and the
    low-speed rule would never get to look. ``readinto1`` returns what one ``recv`` gave
    (straight into the caller's buffer when it is empty), so the rate is seen on every read.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def readinto(self, buffer: Any) -> int:
        return int(self._inner.readinto1(buffer))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _finish(response: urllib3.BaseHTTPResponse) -> None:
    """Return the connection to the pool if the body was read to the end, else drop it."""
    raw = getattr(response, "_fp", None)
    done = isinstance(raw, http.client.HTTPResponse) and raw.isclosed()
    if not done:
        response.close()
    response.release_conn()


def _describe(exc: BaseException) -> str:
    """A short reason: the innermost cause of urllib3's wrapped exceptions."""
    inner: BaseException = exc
    while True:
        nxt = getattr(inner, "reason", None)
        if isinstance(nxt, BaseException) and nxt is not inner:
            inner = nxt
            continue
        break
    text = str(inner) or type(inner).__name__
    if "Connection refused" in text or isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, (TimeoutError, urllib3.exceptions.TimeoutError)):
        return f"timed out ({text})"
    return text
