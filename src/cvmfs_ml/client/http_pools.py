"""urllib3 pools whose responses must bring their headers within one read timeout.

A socket timeout restarts with every byte received, so a server (or proxy) that sends its status
line and headers one byte every few seconds held a fetch for as long as it liked: the body's
low-speed rule (:class:`~cvmfs_ml.client.transfer.SpeedCheck`) never got to look, because the
headers never ended. Upstream's curl applies its low-speed rule from the first byte, so there a
response whose headers take longer than the timeout fails like a slow body. Here the headers get
one deadline, the connection's read timeout, spread over their receives; the body is read from
the socket itself, as before (no extra call per receive).

:func:`pool_manager` makes a ``PoolManager`` (or a ``ProxyManager``) with these pools; the fetcher
and the OCI registry client use it.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

__all__ = [
    "BoundedRetry",
    "HeaderTimeout",
    "SocketWatcher",
    "pool_manager",
    "watching_sockets",
]


class SocketWatcher(Protocol):
    """Who may stop a request while it waits for its answer (a download's cancellation)."""

    def watch_socket(self, sock: socket.socket) -> None:
        """``sock`` now waits for an answer; raises if the request must not wait at all."""

    def forget_socket(self, sock: socket.socket) -> None: ...

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` before a retry; raises if stopped meanwhile."""


_THREAD = threading.local()


@contextlib.contextmanager
def watching_sockets(watcher: SocketWatcher) -> Iterator[None]:
    """The requests this thread sends in the block hand ``watcher`` their socket while they
    wait for the answer's headers, so another thread can shut it down (a request's socket is
    chosen inside urllib3: no caller sees it before the answer)."""
    previous = getattr(_THREAD, "watcher", None)
    _THREAD.watcher = watcher
    try:
        yield
    finally:
        _THREAD.watcher = previous


class HeaderTimeout(TimeoutError):
    """A response's headers did not arrive within the read timeout (urllib3 reports it as its
    ``ReadTimeoutError``, with this as the cause)."""


class _HeaderDeadlineSocket:
    """A connection's socket while one response's headers arrive: each receive waits at most
    what is left of the deadline. Disarmed, receives go straight to the socket."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv_into(self, buffer: Any, *args: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        timeout = self._sock.gettimeout()
        self._sock.settimeout(left if timeout is None else min(timeout, left))
        try:
            return self._sock.recv_into(buffer, *args)
        except TimeoutError as exc:
            if timeout is None or left < timeout:  # the deadline, not the socket's own timeout
                raise self._late() from exc
            raise
        finally:
            self._sock.settimeout(timeout)

    def _late(self) -> HeaderTimeout:
        return HeaderTimeout(f"the response's headers took longer than {self._seconds:g} s")

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.IOBase:
        """What ``http.client`` reads the response from: a buffered reader whose receives are
        this object's (the socket counts it as one of its files, as its own makefile does)."""
        if not hasattr(self._sock, "_io_refs"):  # not a socket (TLS inside a TLS proxy)
            return self._sock.makefile(mode, buffering)  # type: ignore[no-any-return]
        self._sock._io_refs += 1
        raw = socket.SocketIO(self, "rb")  # type: ignore[arg-type]
        size = buffering if buffering and buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedReader(raw, size)

    def disarm(self) -> None:
        """The headers are in: the body's receives go to the socket directly."""
        self.recv_into = self._sock.recv_into  # type: ignore[method-assign]


def _connect_watched(watcher: SocketWatcher, connection: Any) -> socket.socket:
    """urllib3's ``create_connection`` for ``connection``, each socket handed to ``watcher``
    while it connects (Linux ends a connect in progress on ``shutdown``)."""
    host, port = connection._dns_host.strip("[]"), connection.port
    family = urllib3.util.connection.allowed_gai_family()
    error: OSError = OSError("getaddrinfo returns an empty list")
    for af, socktype, proto, _, address in socket.getaddrinfo(
        host, port, family, socket.SOCK_STREAM
    ):
        sock = socket.socket(af, socktype, proto)
        try:
            for option in connection.socket_options or ():
                sock.setsockopt(*option)
            if connection.timeout is None or isinstance(connection.timeout, int | float):
                sock.settimeout(connection.timeout)
            if connection.source_address:
                sock.bind(connection.source_address)
            watcher.watch_socket(sock)
            try:
                sock.connect(address)
            finally:
                watcher.forget_socket(sock)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
        except BaseException:
            sock.close()
            raise
    raise error


class _HeaderDeadline:
    """``getresponse`` with the headers bounded by the read timeout (a mixin for urllib3's
    connection classes, which set ``timeout`` to the read timeout before calling it); with a
    :func:`watching_sockets` watcher on the thread, the connecting socket is watched too."""

    sock: Any
    timeout: Any
    host: str

    def _new_conn(self) -> Any:
        watcher: SocketWatcher | None = getattr(_THREAD, "watcher", None)
        if watcher is None:
            return super()._new_conn()  # type: ignore[misc]
        try:  # the errors urllib3's own _new_conn raises
            return _connect_watched(watcher, self)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(
                self, f"Failed to establish a new connection: {exc}"
            ) from exc

    def getresponse(self) -> Any:
        watcher: SocketWatcher | None = getattr(_THREAD, "watcher", None)
        real = self.sock
        if watcher is None or real is None:
            return self._bounded_response()
        watcher.watch_socket(real)
        try:
            return self._bounded_response()
        finally:
            watcher.forget_socket(real)

    def _bounded_response(self) -> Any:
        return _without_draining(self._headers_in_time())

    def _headers_in_time(self) -> Any:
        seconds = self.timeout
        if self.sock is None or not isinstance(seconds, int | float) or seconds <= 0:
            return super().getresponse()  # type: ignore[misc]
        real = self.sock
        guard = _HeaderDeadlineSocket(real, float(seconds))
        self.sock = guard
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            guard.disarm()
            if self.sock is guard:  # (a response that closes the connection set it to None)
                self.sock = real


class BoundedRetry(urllib3.Retry):
    """urllib3's ``Retry``, waiting at most ``wait_at_most`` seconds where an answer's
    ``Retry-After`` asks for more (urllib3 waits up to six hours per retry), and stopped during
    the wait by the thread's :func:`watching_sockets` watcher."""

    def __init__(self, *args: Any, wait_at_most: float = 60.0, **options: Any) -> None:
        super().__init__(*args, **options)
        self.wait_at_most = wait_at_most

    def new(self, **options: Any) -> BoundedRetry:
        fresh = super().new(**options)
        fresh.wait_at_most = self.wait_at_most
        return fresh

    def increment(self, *args: Any, **options: Any) -> BoundedRetry:
        """No retry once the thread's watcher was stopped (a cancelled download)."""
        watcher: SocketWatcher | None = getattr(_THREAD, "watcher", None)
        if watcher is not None:
            watcher.pause(0)
        return super().increment(*args, **options)  # type: ignore[return-value]

    def parse_retry_after(self, retry_after: str) -> float:
        return min(float(super().parse_retry_after(retry_after)), self.wait_at_most)

    def sleep_for_retry(self, response: Any) -> bool:
        seconds = self.get_retry_after(response)
        if not seconds:
            return False
        watcher: SocketWatcher | None = getattr(_THREAD, "watcher", None)
        if watcher is None:
            time.sleep(seconds)
        else:
            watcher.pause(seconds)
        return True


def _without_draining(response: Any) -> Any:
    """``response``, whose body is dropped with its connection when nobody reads it.

    urllib3 reads the body of an answer it does not hand over (a status it retries, a redirect)
    to the end before it goes on, to use the connection again: a registry or proxy answering
    503 with a body without end held the caller for ever, each receive within the timeout.
    Closing costs one new connection, and only on those answers."""

    def drop() -> None:
        response.close()
        response.release_conn()

    response.drain_conn = drop
    return response


class _HTTPConnection(_HeaderDeadline, HTTPConnection):
    pass


class _HTTPSConnection(_HeaderDeadline, HTTPSConnection):
    pass


# urllib3's names, which its error messages show ("HTTPConnectionPool(host=...): ...")
class HTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class HTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def pool_manager(proxy: str | None = None, **options: Any) -> urllib3.PoolManager:
    """A ``PoolManager`` (through ``proxy``: a ``ProxyManager``) with ``options``, whose
    responses must bring their headers within the read timeout."""
    manager = (
        urllib3.PoolManager(**options) if proxy is None else urllib3.ProxyManager(proxy, **options)
    )
    manager.pool_classes_by_scheme = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
    return manager
