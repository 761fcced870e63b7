"""HTTP downloads with upstream's host and proxy failover (cvmfs-format.md §10.4, §10.5).

One :class:`Fetcher` serves a whole client: it is thread-safe, keeps keep-alive connection pools
(one ``urllib3`` pool manager for DIRECT and one per proxy, each sized for the prefetch
concurrency) and shares the failover state between threads, as upstream's download manager does:
when one request finds a proxy or host broken, the following requests start from the next one.

Every body is checked while it streams: the hash runs over the raw received bytes (the object
name is the hash of the stored, usually compressed, bytes: §5), then the bytes are inflated into
the sink. Memory stays bounded by the 1 MiB read buffer (plus zlib's window), so a multi-GB
object never sits in memory when :meth:`Fetcher.fetch_into` is used. One request and its body
are :mod:`cvmfs_ml.client.transfer`; this module is the failover around them.

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
  The status line and headers get one timeout in all (:mod:`.http_pools`): a socket timeout
  restarts with every byte, so headers trickled a byte at a time held a fetch forever.
* Data that fails the hash, the zlib decoder or the announced length is fetched once more on the
  same path with ``Cache-Control: no-cache`` and ``Pragma: no-cache``; a second bad body is a
  failure of that proxy (of the host when DIRECT). Upstream makes it a host failure even through
  a proxy; blaming the proxy first means one corrupting cache does not take a good Stratum 1
  out of rotation, and a host that really serves bad bytes still fails once all proxies have.
* A proxy failure moves to the next proxy of the group, then to the next group. When every proxy
  has failed for one host, that is a host failure and the next host is tried through all proxies.
* No socket for want of file descriptors (EMFILE, ENFILE) is this process's shortage, not a
  failure of any server or proxy: it is raised as that ``OSError`` at once, with no retry and
  no failover, for the caller to close idle files and try again.
* When nothing works, :class:`~cvmfs_ml.errors.DownloadError` lists every ``(url, proxy, reason)``.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError

from cvmfs_ml import __version__
from cvmfs_ml.client.config import DIRECT, ClientConfig
from cvmfs_ml.client.http_pools import pool_manager
from cvmfs_ml.client.transfer import (
    PIECE_SIZE,
    Counters,
    Failure,
    FetchStats,
    FileSink,
    Job,
    Kind,
    MemorySink,
    Sink,
    check_status,
    describe,
    finish,
    read_body,
)
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.errors import ConfigError, DownloadError

__all__ = ["DIRECT", "PIECE_SIZE", "FetchStats", "Fetcher"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 4  # upstream: "follow up to 4 HTTP redirects"


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
        self._counters = Counters()
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
        memory = MemorySink()
        self._run(rel_path, expected, compressed, memory, memory.reset, nocache,
                  max_bytes=max_bytes)
        return memory.value()

    def fetch_into(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        fileobj: BinaryIO | Sink,
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
        sink = FileSink(fileobj)
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
        sink: Sink,
        reset: Callable[[], None],
        nocache: bool,
        *,
        byte_range: tuple[int, int] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        rel = _clean_rel_path(rel_path)
        job = Job(rel, expected, compressed, sink, reset, nocache, self.max_retries, max_bytes)
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
                if outcome is Kind.HOST:
                    log.info("host %s failed for %s, trying the next host", url, rel)
                    self._host_failed(host_index)
                    break
                log.info("proxy %s failed for %s, trying the next proxy", proxy, url)
                self._proxy_failed(proxy)
            else:
                # every proxy failed: upstream's kFailHostAfterProxy
                self._host_failed(host_index)
        raise DownloadError(rel, job.attempts)

    def _try_path(self, job: Job, url: str, proxy: str) -> Kind | None:
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
            except Failure as failure:
                note = " (no-cache)" if nocache else ""
                job.attempts.append((url, proxy, failure.reason + note))
                log.debug("%s via %s: %s%s", url, proxy, failure.reason, note)
                kind = failure.kind
            if kind is Kind.BAD_DATA:
                self._counters.add("bad_data")
                if not nocache:
                    nocache = True
                    self._counters.add("retries")
                    continue
                return Kind.PROXY if proxy != DIRECT else Kind.HOST
            if kind in (Kind.PROXY_TRANSFER, Kind.HOST_TRANSFER):
                if job.retries_left > 0:
                    job.retries_left -= 1
                    self._counters.add("retries")
                    self._backoff(job)
                    continue
                return Kind.PROXY if kind is Kind.PROXY_TRANSFER else Kind.HOST
            return kind

    def _backoff(self, job: Job) -> None:
        """Sleep before a same-path retry: random up to ``backoff_init``, then doubling."""
        if job.backoff == 0.0:
            job.backoff = self._rng.uniform(0.0, self.backoff_init)
        else:
            job.backoff *= 2
        job.backoff = min(job.backoff, self.backoff_max)
        if job.backoff > 0:
            time.sleep(job.backoff)

    # ------------------------------------------------------------------ one HTTP request

    def _transfer(self, job: Job, url: str, proxy: str, nocache: bool) -> None:
        transfer = Kind.PROXY_TRANSFER if proxy != DIRECT else Kind.HOST_TRANSFER
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
        except (Urllib3Error, OSError, http.client.HTTPException) as exc:
            shortage = _descriptor_shortage(exc)
            if shortage is not None:
                # No socket for want of descriptors: this process's shortage, not the server's
                # or the proxy's, so no failover; the caller frees some (FetchOnce) or says so.
                raise OSError(shortage, f"{os.strerror(shortage)}: no socket for {url}") from exc
            reason = (exc.reason or exc) if isinstance(exc, MaxRetryError) else exc
            raise Failure(transfer, describe(reason)) from exc
        try:
            check_status(response, proxy)
            if job.byte_range is not None and response.status != 206:
                raise Failure(Kind.HOST, f"HTTP {response.status}: the server ignored Range")
            read_body(
                response, transfer, job, seconds, self._buffer(), self.low_speed_limit,
                self._counters,
            )
        finally:
            finish(response)

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
                manager = pool_manager(None if proxy == DIRECT else proxy, **options)
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


def _descriptor_shortage(exc: BaseException) -> int | None:
    """EMFILE or ENFILE when ``exc`` (or what it wraps) is a socket this process could not
    open for want of file descriptors."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in (errno.EMFILE, errno.ENFILE):
            return item.errno
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None)]
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
