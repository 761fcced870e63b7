"""The registry's HTTP/1.1 connections: uvicorn's httptools protocol with a bound on the
request head (the request line and headers) in size and in time.

Why: uvicorn's httptools protocol kept every byte of a request head it was sent, without a
limit (httptools even gathers one header's value across reads before handing it over), and
once a head's first byte had come it waited for the rest for ever (its keep-alive timeout
stops at the first byte). One client could grow the registry's memory as it liked, or hold
connections, and their file descriptors, open with a few bytes each. Now a head larger than
:data:`MAX_HEAD_BYTES` is answered 431 and one not complete within ``upload_low_speed_seconds``
(the window bodies get, from the connection's start, for a later request from its first
byte; 0: no limit) 408, and the connection is closed (nginx answers the same, with
``large_client_header_buffers`` and ``client_header_timeout``); one that sent nothing in it
is closed.

And the connections open at once: any number were taken, each a file descriptor the registry
also needs for its files and databases. Past ``max_connections`` a new connection is
answered 503 with ``Retry-After`` at its first bytes and closed (one idle is closed by
uvicorn's keep-alive timeout, 5 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cvmfs_ml.registry.config import RegistryConfig
from cvmfs_ml.registry.metrics import RegistryMetrics

__all__ = ["KEEP_ALIVE_SECONDS", "MAX_HEAD_BYTES", "bounded_http"]

MAX_HEAD_BYTES = 64 * 1024
KEEP_ALIVE_SECONDS = 75
"""Seconds an idle connection is kept (nginx's ``keepalive_timeout``): longer than any
``Retry-After`` the registry sends (5 s busy, 60 s for tarballs), because a client that waits it
sends its retry on the same connection. At uvicorn's 5 s the server closed it just as the retry
came, and the client's write failed ('broken pipe'), which skopeo does not retry."""
"""Bytes a request head may take (nginx takes 4 x 8 KiB by default; h11 16 KiB)."""


def bounded_http(
    config: Callable[[], RegistryConfig], metrics: RegistryMetrics
) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.run(http=...)``; ``config()`` is read as each
    connection and head starts; refusals count in ``errors_total`` (``head_size``,
    ``head_slow``, ``connections``) and ``metrics.connections`` is the connections open."""

    def refused(kind: str) -> None:
        metrics.errors.labels(kind).inc()

    class BoundedHttpTools(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_done = False  # between a head's end and its message's end
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._over = False  # past max_connections: refused at its first bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            metrics.connections.set(len(self.connections))
            self._over = len(self.connections) > config().max_connections
            # The head's window runs from here (uvicorn times a connection only after a
            # response): one that never sent a byte was held for ever. One past the limit
            # is answered at its first bytes, or closed after a second.
            seconds = 1.0 if self._over else config().upload_low_speed_seconds
            if seconds > 0:
                self._head_timer = self.loop.call_later(seconds, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            if self._over:
                refused("connections")
                limit = config().max_connections
                self._refuse(503, "Service Unavailable", f"{limit} connections are open"
                             " (max_connections); retry in 5 s", {"retry-after": "5"})  # fmt: skip
                return
            if not self._head_done:
                self._head_bytes += len(data)
                seconds = config().upload_low_speed_seconds
                if self._head_timer is None and seconds > 0:
                    self._head_timer = self.loop.call_later(seconds, self._head_too_slow)
            super().data_received(data)
            if not self._head_done and self._head_bytes > MAX_HEAD_BYTES:
                refused("head_size")
                reason = f"the request line and headers pass {MAX_HEAD_BYTES} bytes"
                self._refuse(431, "Request Header Fields Too Large", reason)

        def on_headers_complete(self) -> None:
            self._head_done, self._head_bytes = True, 0
            self._stop_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_done = False  # what comes next is the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)
            metrics.connections.set(len(self.connections))

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._head_done or self.transport.is_closing():
                return
            refused("connections" if self._over else "head_slow")
            if self._over or not self._head_bytes:  # nothing asked: nothing to answer
                self.transport.close()
                return
            self._refuse(408, "Request Timeout",
                         "the request line and headers did not arrive in time")  # fmt: skip

        def _refuse(self, status: int, phrase: str, reason: str,
                    headers: dict[str, str] | None = None) -> None:  # fmt: skip
            if self.transport.is_closing():
                return
            body = f"{reason}\n".encode()
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            self.transport.write(
                f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n".encode()
                + body
            )
            self.transport.close()

    return BoundedHttpTools
