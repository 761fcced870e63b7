"""One HTTP transfer of :class:`~cvmfs_ml.client.fetcher.Fetcher`: what its answer means, and
its body streamed through the checks into a sink.

* :func:`check_status` maps the status line to upstream's failure classes (:class:`Kind`);
* :func:`read_body` streams the body: bounded by the caller's size (raw and inflated), the
  low-speed rule after every receive, the hash over the raw bytes, the inflater, then the sink;
* :class:`FetchStats` counts what the fetcher did, including where its CPU time went per phase
  (receive, hash, inflate-and-store), so a profile of a cold read is one ``stats`` call away.

The body lands in one reusable per-thread buffer and each receive is hashed and written while
the next one is in flight in the kernel's socket buffer: memory stays bounded by that buffer
(plus zlib's window) whatever the object's size.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from cvmfs_ml.client.config import DIRECT
from cvmfs_ml.client.http_pools import HeaderTimeout, watching_sockets
from cvmfs_ml.cvmfs.hashing import Digest, new_hasher
from cvmfs_ml.cvmfs.objects import Decompressor, stored_bound
from cvmfs_ml.errors import CvmfsMlError, DownloadError, FormatError

if TYPE_CHECKING:
    from cvmfs_ml.cvmfs.hashing import Hasher

__all__ = [
    "PIECE_SIZE",
    "Cancellation",
    "CancelledError",
    "Failure",
    "FetchStats",
    "FileSink",
    "Job",
    "Kind",
    "MemorySink",
    "RequestStopped",
    "Sink",
    "body_readinto",
    "check_status",
    "describe",
    "finish",
    "read_body",
]

PIECE_SIZE = 1 << 20
"""Bytes read from the socket at a time: large enough for 5+ GB/s, small enough to stay cached."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Kind(enum.Enum):
    """What a failed try says about where to go next (upstream ``Failures``, simplified)."""

    PROXY = "proxy"  # switch proxy now
    HOST = "host"  # switch host now
    PROXY_TRANSFER = "proxy transfer"  # back off and retry, then switch proxy
    HOST_TRANSFER = "host transfer"  # back off and retry, then switch host
    BAD_DATA = "bad data"  # retry once with no-cache, then blame the path


class Failure(Exception):
    """A failed try, with what it says about the path (:class:`Kind`) and why."""

    def __init__(self, kind: Kind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Sink(Protocol):
    """Where a body's verified (and inflated) content goes."""

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
    receive_cpu_s: float = 0.0  # thread CPU receiving bodies (socket copies, TCP)
    hash_cpu_s: float = 0.0  # thread CPU hashing bodies (verification)
    store_cpu_s: float = 0.0  # thread CPU inflating and writing into sinks (cache: + CRC-32)

    def __sub__(self, other: FetchStats) -> FetchStats:
        return FetchStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


class Counters:
    """The :class:`FetchStats` of one fetcher, updated by all its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {f.name: f.default for f in fields(FetchStats)}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def add_seconds(self, receiving: float, hashing: float, storing: float) -> None:
        with self._lock:
            self._values["receive_cpu_s"] += receiving
            self._values["hash_cpu_s"] += hashing
            self._values["store_cpu_s"] += storing

    def snapshot(self) -> FetchStats:
        with self._lock:
            return FetchStats(**self._values)  # type: ignore[arg-type]


class MemorySink:
    """Collects a small body in memory (manifest, whitelist, catalogs fetched whole)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    def reset(self) -> None:
        self.parts.clear()

    def value(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class FileSink:
    """Writes into the caller's file; rewinds it when a try has to start over."""

    def __init__(self, fileobj: Sink) -> None:
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
class Job:
    """One fetch: what to get and how to check it, plus upstream's ``JobInfo`` retry state."""

    what: str
    expected: Digest | None
    compressed: bool
    sink: Sink
    reset: Callable[[], None]
    nocache: bool
    retries_left: int
    max_bytes: int | None = None  # content bound (inflated); the raw body is bounded to match
    backoff: float = 0.0
    attempts: list[tuple[str, str, str]] = field(default_factory=list)
    byte_range: tuple[int, int] | None = None  # [first, last] byte of an HTTP Range request


def read_body(
    response: urllib3.BaseHTTPResponse,
    transfer: Kind,
    job: Job,
    seconds: float,
    view: memoryview,
    low_speed_limit: int,
    counters: Counters,
) -> None:
    """Stream ``response``'s body through the checks into ``job.sink``, receiving into ``view``.

    ``transfer`` is the failure class of a network problem on this path and ``seconds`` the
    window of the low-speed rule. Raises :class:`Failure`. The thread CPU time of each phase
    (receive, hash, inflate and store) is added to ``counters``: one clock read per phase per
    receive (receives average hundreds of KiB), so it is always on.
    """
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    expected, sink = job.expected, job.sink
    raw_limit = None if job.max_bytes is None else stored_bound(job.max_bytes, job.compressed)
    if raw_limit is not None and length is not None and length > raw_limit:
        raise Failure(Kind.BAD_DATA, f"announces {length} bytes, more than {raw_limit}")
    hasher: Hasher | None = new_hasher(expected.algorithm) if expected else None
    inflater = Decompressor(job.what, max_output=job.max_bytes) if job.compressed else None
    readinto = body_readinto(response)
    speed = SpeedCheck(low_speed_limit, seconds)
    clock = time.thread_time
    total = 0
    receiving = hashing = storing = 0.0
    try:
        while True:
            room = view if raw_limit is None else view[: max(1, raw_limit - total + 1)]
            t0 = clock()
            try:
                n = readinto(room)
            except (TimeoutError, ReadTimeoutError) as exc:
                raise Failure(transfer, f"read timed out after {total} bytes") from exc
            except (ProtocolError, OSError, http.client.HTTPException, Urllib3Error) as exc:
                raise Failure(
                    Kind.BAD_DATA, f"truncated after {total} bytes: {describe(exc)}"
                ) from exc
            t1 = clock()
            receiving += t1 - t0
            if not n:
                break
            piece = view[:n]
            total += n
            if raw_limit is not None and total > raw_limit:
                raise Failure(Kind.BAD_DATA, f"larger than {raw_limit} bytes")
            slow = speed.after(n)
            if slow:
                raise Failure(transfer, slow)
            if hasher is not None:
                hasher.update(piece)  # releases the GIL: other fetches run meanwhile
            t2 = clock()
            hashing += t2 - t1
            if inflater is None:
                sink.write(piece)
            else:
                try:
                    for out in inflater.pieces(piece):
                        sink.write(out)
                except FormatError as exc:
                    raise Failure(Kind.BAD_DATA, exc.reason) from exc
            storing += clock() - t2
    finally:
        counters.add("bytes_received", total)
        counters.add_seconds(receiving, hashing, storing)
    if length is not None and total != length:
        raise Failure(Kind.BAD_DATA, f"truncated: {total} of {length} bytes")
    if hasher is not None and expected is not None:
        got = Digest(expected.algorithm, hasher.digest())
        if got != expected:
            raise Failure(Kind.BAD_DATA, f"hash mismatch: got {got.hex}")
    if inflater is not None:
        try:
            tail = inflater.flush()
        except FormatError as exc:
            raise Failure(Kind.BAD_DATA, exc.reason) from exc
        if tail:
            sink.write(tail)


# ---------------------------------------------------------------------- helpers


class SpeedCheck:
    """curl's low-speed rule: fail when a ``seconds`` window moves fewer than ``limit * seconds``
    bytes (upstream sets ``CURLOPT_LOW_SPEED_TIME`` to the timeout)."""

    def __init__(self, limit: int, seconds: float, name: str = "CVMFS_LOW_SPEED_LIMIT") -> None:
        self.limit = limit
        self.name = name  # the setting to name in the reason
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
                f"slower than {self.name}={self.limit} B/s "
                f"({self.moved} bytes in {elapsed:.1f} s)"
            )
        self.start, self.moved = now, 0
        return None


def check_status(response: urllib3.BaseHTTPResponse, proxy: str) -> None:
    """Map the status line to upstream's failure classes (download.cc CallbackCurlHeader)."""
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status}"
    if status in _REDIRECTS:
        raise Failure(Kind.HOST, f"{reason} redirect not followed (CVMFS_FOLLOW_REDIRECTS)")
    if status == 429:
        raise Failure(Kind.HOST_TRANSFER, f"{reason} (throttled)")
    if status // 100 == 5 or status in (400, 404):
        if proxy != DIRECT and _proxy_says_error(response):
            raise Failure(Kind.PROXY, f"{reason} from the proxy")
        raise Failure(Kind.HOST, reason)
    raise Failure(Kind.PROXY if proxy != DIRECT else Kind.HOST, reason)


def _proxy_says_error(response: urllib3.BaseHTTPResponse) -> bool:
    if response.headers.get("X-Squid-Error"):
        return True
    return "error=" in response.headers.get("Proxy-Status", "")


def body_readinto(response: urllib3.BaseHTTPResponse) -> Callable[[memoryview], int]:
    """The fastest way to read this body into a caller's buffer.

    ``urllib3``'s own ``readinto`` reads into a fresh ``bytes`` and copies. When the body is the
    plain ``http.client`` response underneath (no content decoding asked for), reading straight
    into our buffer skips that copy; :func:`finish` then hands the connection back to the pool.
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


class Cancellation:
    """Downloads that whoever started them can stop at once, from any thread.

    A read blocked on a stalled server returns only when the socket's timeout (or the
    low-speed rule) ends it; a process unwinding (SIGTERM, a refused image) would wait for it.
    :meth:`cancel` shuts down the socket of every response registered (:meth:`watch`), so the
    blocked read returns at once and fails, and refuses every later one, which therefore fails
    before it is sent or as soon as its answer comes. A request sent inside :meth:`requests`
    is stopped the same way while it still waits for its answer's headers (a registry that
    reads the request and never answers), or waits to retry (``Retry-After``).
    As a context manager: cancelled when its block is left by an exception.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._responses: set[urllib3.BaseHTTPResponse] = set()
        self._sockets: set[socket.socket] = set()
        self._stopped = threading.Event()
        self.cancelled = False

    def check(self) -> None:
        """Raise :class:`CancelledError` once cancelled."""
        if self.cancelled:
            raise CancelledError

    def watch(self, response: urllib3.BaseHTTPResponse) -> None:
        """Shut ``response``'s socket down on :meth:`cancel` (until :meth:`forget`)."""
        with self._lock:
            self.check()
            self._responses.add(response)

    def forget(self, response: urllib3.BaseHTTPResponse) -> None:
        with self._lock:
            self._responses.discard(response)

    def requests(self) -> contextlib.AbstractContextManager[None]:
        """A block whose requests (on this thread) :meth:`cancel` stops while they wait for
        their answer's headers, and refuses once cancelled."""
        return watching_sockets(self)

    def watch_socket(self, sock: socket.socket) -> None:
        """Shut ``sock`` down on :meth:`cancel` (until :meth:`forget_socket`); once cancelled,
        :class:`RequestStopped`, which urllib3 does not take for a connection to retry."""
        with self._lock:
            if self.cancelled:
                raise RequestStopped
            self._sockets.add(sock)

    def forget_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (a registry's ``Retry-After``), or until :meth:`cancel`:
        :class:`RequestStopped` then."""
        if self._stopped.wait(seconds):
            raise RequestStopped

    def __enter__(self) -> Cancellation:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        """Leaving the block by an exception (a refused blob, SIGTERM) cancels."""
        if exc_type is not None:
            self.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            responses = list(self._responses)
            sockets = list(self._sockets)
        self._stopped.set()
        for response in responses:
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                sockets.append(sock)
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed already: nothing to stop
                sock.shutdown(socket.SHUT_RDWR)


class CancelledError(DownloadError):
    """A download stopped by :meth:`Cancellation.cancel`."""

    def __init__(self) -> None:
        super().__init__("a blob (the download was cancelled)")


class RequestStopped(CvmfsMlError):
    """A request of a :meth:`Cancellation.requests` block refused after :meth:`~Cancellation.
    cancel` (not an ``OSError``, so urllib3 does not retry it); its caller raises
    :class:`CancelledError`."""


def finish(response: urllib3.BaseHTTPResponse) -> None:
    """Return the connection to the pool if the body was read to the end, else drop it."""
    raw = getattr(response, "_fp", None)
    done = isinstance(raw, http.client.HTTPResponse) and raw.isclosed()
    if not done:
        response.close()
    response.release_conn()


def describe(exc: BaseException) -> str:
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
        if isinstance(inner.__cause__, HeaderTimeout):  # urllib3 words all read timeouts alike
            text = str(inner.__cause__)
        return f"timed out ({text})"
    return text
