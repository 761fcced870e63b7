"""Test servers that stay quiet when a client hangs up.

``socketserver``'s default ``handle_error`` prints "Exception occurred during processing of
request" and a traceback to stderr for every exception a handler lets out. Clients in these
tests hang up on purpose (a refused body, a timeout, a closed pool), so a broken pipe or a reset
connection is normal and says nothing. Anything else is kept in ``errors`` (a test may assert it
is empty) and logged as one line, which pytest shows with the test that caused it.
"""

from __future__ import annotations

import http.server
import logging
import socketserver
import sys

log = logging.getLogger("tests.servers")


class QuietErrors:
    """Mixin for a ``socketserver`` server: client disconnects are ignored, other errors kept
    in ``errors`` and logged on one line."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.errors: list[BaseException] = []
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if error is None or isinstance(error, ConnectionError):  # BrokenPipe, reset, aborted
            return
        self.errors.append(error)
        log.error("test server %s: %s: %s (request from %s)",
                  type(self).__name__, type(error).__name__, error, client_address)  # fmt: skip


class QuietHTTPServer(QuietErrors, http.server.ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` (daemon handler threads) that is quiet about disconnects."""

    daemon_threads = True


class QuietTCPServer(QuietErrors, socketserver.ThreadingTCPServer):
    """A ``ThreadingTCPServer`` (daemon handler threads) that is quiet about disconnects."""

    daemon_threads = True
