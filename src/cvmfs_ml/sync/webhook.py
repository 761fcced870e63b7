"""Push notifications from registries: sync the named repository now, not at the next interval.

Two payloads are understood (DUCC's ``ducc/webhook/registry_webhook.py`` takes the same two):

* **Docker distribution notifications** (``notifications.endpoints`` in the registry's
  ``config.yml``; envelope ``application/vnd.docker.distribution.events.v1+json``):
  ``{"events": [{"action": "push", "target": {"repository", "tag", "digest", "mediaType"},
  "request": {"host"}}]}``. Blob pushes are ignored; manifest pushes and deletes count.
* **Harbor webhooks** (``PUSH_ARTIFACT``, ``DELETE_ARTIFACT``, ``REPLICATION``):
  ``{"type", "event_data": {"repository": {"repo_full_name"}, "resources": [{"tag",
  "resource_url"}]}}``.

The server answers ``202`` and hands the repositories to a callback; the sync loop runs a round
restricted to them. With a token configured, requests must carry ``Authorization: Bearer
<token>`` (both registries can send a fixed header).

Everything a sender controls is bounded: the body (1 MiB), the events in it (1000 distinct),
each receive (``read_timeout``), the whole request (``request_timeout``, so a sender trickling a
byte at a time cannot hold a connection for days), and the connections served at once (more
are answered ``503`` without a thread of their own).
"""

from __future__ import annotations

import hmac
import http.server
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError

__all__ = ["RegistryEvent", "WebhookServer", "parse_notification"]

MAX_BODY_BYTES = 1 * 2**20
MAX_EVENTS = 1000  # distinct events in one notification; registries send one or a few
MAX_CONNECTIONS = 32  # served at once; a registry sends its notifications one by one
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 5\r\nRetry-After: 1\r\n\r\nbusy\n"
_logger = logging.getLogger(__name__)
_MANIFEST_HINTS = ("manifest", "index")
_HARBOR_ACTIONS = {"PUSH_ARTIFACT": "push", "DELETE_ARTIFACT": "delete", "REPLICATION": "push"}


@dataclass(frozen=True)
class RegistryEvent:
    action: str  # "push" or "delete"
    repository: str
    tag: str = ""
    digest: str = ""
    registry: str = ""


def _listed(value: Any, what: str) -> list[Any]:
    """``value`` if it is a JSON array (or absent), else a :class:`FormatError`: the body comes
    from the network, and a sender's wrong type must be a 400, not a crashed handler."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise FormatError("webhook body", f"{what} is not an array")
    return value


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty (optional parts of an event)."""
    return value if isinstance(value, dict) else {}


def _docker_events(payload: dict[str, Any]) -> list[RegistryEvent]:
    out = []
    for event in _listed(payload.get("events"), "'events'"):
        if not isinstance(event, dict):
            continue
        action = event.get("action")
        target = event.get("target") or {}
        if action not in ("push", "delete") or not isinstance(target, dict):
            continue
        media_type = str(target.get("mediaType") or "")
        if action == "push" and not (
            target.get("tag") or any(h in media_type for h in _MANIFEST_HINTS)
        ):
            continue  # a blob upload: the manifest push that follows is the event
        repository = target.get("repository")
        if not isinstance(repository, str) or not repository:
            continue
        host = _object(event.get("request")).get("host", "")
        out.append(RegistryEvent(action, repository, str(target.get("tag") or ""),
                                 str(target.get("digest") or ""), str(host or "")))  # fmt: skip
    return out


def _harbor_events(payload: dict[str, Any]) -> list[RegistryEvent]:
    action = _HARBOR_ACTIONS.get(str(payload.get("type")))
    data = payload.get("event_data") or {}
    if action is None or not isinstance(data, dict):
        return []
    repository = _object(data.get("repository")).get("repo_full_name")
    if not isinstance(repository, str) or not repository:
        return []
    out = []
    for resource in _listed(data.get("resources"), "'event_data.resources'") or [{}]:
        resource = _object(resource)
        url = str(resource.get("resource_url") or "")
        registry = url.split("/", 1)[0] if "/" in url else ""
        out.append(RegistryEvent(action, repository, str(resource.get("tag") or ""),
                                 str(resource.get("digest") or ""), registry))  # fmt: skip
    return out


def parse_notification(body: bytes) -> list[RegistryEvent]:
    """The repository events in a Docker distribution or Harbor webhook body."""
    try:
        payload = jsontext.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError("webhook body", f"not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise FormatError("webhook body", "not a JSON object")
    if "events" in payload:
        events = _docker_events(payload)
    elif "type" in payload and "event_data" in payload:
        events = _harbor_events(payload)
    else:
        raise FormatError("webhook body", "neither a Docker distribution nor a Harbor notification")
    # Each event is a logged line and a remembered repository in the sync loop: the same event
    # repeated counts once, and a body naming thousands is refused rather than fanned out.
    unique = list(dict.fromkeys(events))
    if len(unique) > MAX_EVENTS:
        raise FormatError("webhook body", f"more than {MAX_EVENTS} events; send fewer at a time")
    return unique


class _DeadlineReader(io.RawIOBase):
    """The connection's receives, each bounded by ``per_read`` and by what is left of one
    deadline for the whole request. A socket timeout alone bounds the wait for each piece, so
    a sender trickling one byte a second kept its connection (and a thread) for as long as it
    liked; here every receive is checked against the deadline before it starts."""

    def __init__(self, sock: socket.socket, per_read: float, deadline: float) -> None:
        super().__init__()
        self._sock, self._per_read, self._deadline = sock, per_read, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its deadline")
        self._sock.settimeout(min(left, self._per_read))
        return self._sock.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: WebhookServer

    def setup(self) -> None:
        # Every read and write of the connection is bounded: a sender that declares a body
        # and stalls (or never finishes its headers) loses the connection after this long
        # instead of holding a thread forever.
        self.timeout = self.server.read_timeout
        super().setup()
        self.rfile.close()
        deadline = time.monotonic() + self.server.request_timeout
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, self.server.read_timeout, deadline)
        )

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, "cvmfs-ml sync webhook: POST registry notifications here")

    def do_POST(self) -> None:
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._answer(401, "missing or wrong token")
                return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, "Content-Length required")
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._answer(413, f"body larger than {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length)
        if len(body) < length:  # the sender closed early: a cut body is no notification
            self._answer(400, f"body shorter than its Content-Length ({len(body)} < {length})")
            return
        try:
            events = parse_notification(body)
        except FormatError as exc:
            self._answer(400, str(exc))
            return
        if events:
            self.server.on_events(events)
        self._answer(202, f"{len(events)} event(s) accepted")


class WebhookServer(http.server.ThreadingHTTPServer):
    """Receives notifications on ``host:port`` (0 picks a free port) in a background thread."""

    daemon_threads = True

    def __init__(
        self,
        on_events: Callable[[list[RegistryEvent]], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        read_timeout: float = 30.0,
        request_timeout: float = 60.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.on_events = on_events
        self.token = token
        self.read_timeout = read_timeout
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per connection, but only so many at once: a flood of connections (each
        # held until its deadline) would otherwise start threads until the process has none
        # left. Beyond the limit the sender is told to come back, from this thread, at once.
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr for any error of a connection, such as
        # a sender resetting it mid-body: that is the sender's failure, not the service's, and
        # the service's stderr is for lines an operator acts on.
        _logger.debug("webhook connection from %s failed", client_address, exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> WebhookServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="webhook")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
