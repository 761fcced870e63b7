"""A small HTTP server for repository folders: ``cvmfs-ml serve ROOT``.

A CVMFS repository is a folder of static files, so any web server can act as its Stratum 0/1
(docs/nginx.conf is the production setup). This server exists so that a user can try a
repository, and tests can serve one, with nothing but Python installed. It behaves like the
nginx configuration on the points clients and proxies depend on (cvmfs-format.md §1, §11):

* ``ROOT/<fqrn>/<path>`` is served at ``/cvmfs/<fqrn>/<path>`` when ``ROOT/<fqrn>`` is a
  repository (holds ``.cvmfspublished``); nothing else is served: a path that leaves the
  repository's folder (``..``, or a symlink whose target is outside), key files (``*.key``,
  ``*.masterkey``, ``*.crt``) and the staging area ``data/txn`` get 404 (issue 9);
* ``/cvmfs/info/v1/repositories.json`` and ``meta.json`` are generated for monitors, in
  upstream's shapes (storage/info.py);
* ``Cache-Control: max-age=61`` for ``.cvmfs*`` files (they change on every publish, and Squid
  does not cache anything valid for 60 s or less), ``max-age=259200`` for the immutable ``data/``
  objects, 61 s for anything else;
* no ``Last-Modified`` or ``ETag``, and ``If-Modified-Since`` is ignored, as upstream's Apache
  configuration does to avoid Squid bugs;
* ``Content-Type: application/x-cvmfs`` for ``.cvmfs*`` files, ``application/octet-stream``
  for everything else;
* HTTP/1.1 with keep-alive and a ``Content-Length`` on every response (a new connection costs a
  round trip), GET and HEAD, one ``Range: bytes=`` range per request (206, or 416 when it
  cannot be satisfied);
* bodies go out with ``sendfile`` straight from the page cache, because objects can be GBs.

Python's own ``http.server`` speaks HTTP/1.0 without Range support, hence this module.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import socketserver
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import unquote, urlsplit

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.storage.info import INFO_PREFIX, info_document

__all__ = [
    "RepositoryServer",
    "RequestRecord",
    "cache_headers",
    "parse_range",
    "private_keys_under",
]

# Cache lifetimes of upstream's Stratum 1 configuration (cvmfs-format.md §11).
MUTABLE_MAX_AGE = 61
IMMUTABLE_MAX_AGE = 259200

# Bodies up to this size are sent in the same write as the headers: one packet instead of two,
# which also avoids a Nagle/delayed-ACK stall on keep-alive connections.
_SMALL_BODY = 64 * 1024

# Seconds an idle keep-alive connection may stay open before its thread gives up.
_IDLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as written to the access log and passed to ``on_request``.

    ``bytes`` counts body bytes actually sent; ``range`` is the request's Range header or None.
    """

    client: str
    method: str
    path: str
    status: int
    bytes: int
    range: str | None


class _Unsatisfiable(Exception):
    """A syntactically valid byte range that lies outside the file (answer 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Turn a ``Range`` header into ``(start, stop)`` (stop exclusive) for a body of ``size``.

    Returns None when the whole body should be sent: no header, a unit other than ``bytes``,
    a malformed value or several ranges (RFC 9110 §14.2 lets a server ignore those). Raises
    :class:`ValueError` when the range is well formed but unsatisfiable (the caller answers 416).
    """
    try:
        return _parse_range(header, size)
    except _Unsatisfiable as error:
        raise ValueError(str(error)) from None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable(f"bytes=-{suffix} of {size}")
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable(f"bytes={start}- of {size}")
    stop = size if last == "" else min(int(last) + 1, size)
    return start, stop


def cache_headers(name: str, in_data: bool) -> tuple[str, str]:
    """``(Content-Type, Cache-Control)`` for a file called ``name``.

    ``in_data`` says whether the file is under the repository's ``data/`` folder, whose objects
    are content-addressed and therefore never change.
    """
    if name.startswith(".cvmfs"):
        return "application/x-cvmfs", f"max-age={MUTABLE_MAX_AGE}"
    max_age = IMMUTABLE_MAX_AGE if in_data else MUTABLE_MAX_AGE
    return "application/octet-stream", f"max-age={max_age}"


class RepositoryServer:
    """Serve the repositories under ``root`` over HTTP (see the module docstring).

    The socket is bound in the constructor, so :attr:`url` is known (and ``port=0`` resolved)
    before serving starts. Use :meth:`start` to serve from a background thread, or
    :meth:`serve_forever` to serve from the calling thread; :meth:`stop` ends both and also
    closes idle keep-alive connections. As a context manager it starts and stops itself.

    ``access_log`` appends one line per request in the nginx format of docs/nginx.conf;
    ``on_request`` is called with a :class:`RequestRecord` for every request (from the serving
    thread, so keep it quick). Both are off by default: the server prints nothing.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: Path | None = None,
        on_request: Callable[[RequestRecord], None] | None = None,
        plain_folders: Sequence[str] = (),
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"cannot serve {root}: not a directory")
        self.root = root
        self.real_root = os.path.realpath(root)
        # Folders under ROOT served as plain files although they hold no repository: named
        # explicitly by an embedding program (the benchmarks' plain model copies), never by
        # default; key files stay refused in them too.
        self.plain_folders = frozenset(plain_folders)
        self.on_request = on_request
        self._lock = threading.Lock()
        self._requests = 0
        self._bytes_sent = 0
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._log_file: IO[str] | None = (
            open(access_log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            if access_log is not None
            else None
        )
        self._thread: threading.Thread | None = None
        self._serving_ident: int | None = None
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self.host = host
        self.port = int(self._httpd.server_address[1])

    # -- public API --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash; repositories are at ``/cvmfs/<fqrn>``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> int:
        """How many requests have been answered so far (any status).

        A request is counted once its body has been sent, which can be after the client has
        read the last byte: use :meth:`wait_for_requests` to read the count after a load.
        """
        return self._requests

    @property
    def bytes_sent(self) -> int:
        """Body bytes of the requests counted in :attr:`requests`."""
        return self._bytes_sent

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` seconds) until no request is under way; whether it is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> int:
        """Wait (at most ``timeout`` seconds) until ``count`` requests are counted; the count."""
        with self._idle:
            self._idle.wait_for(lambda: self._requests >= count, timeout=timeout)
            return self._requests

    def start(self) -> Self:
        """Serve from a daemon thread and return at once."""
        if self._thread is None:
            # A short poll interval makes stop() quick, which matters for tests and embedding.
            self._thread = threading.Thread(
                target=self.serve_forever,
                args=(0.05,),
                name=f"cvmfs-ml-http-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve from the calling thread until :meth:`stop` is called from another thread.

        ``stop()`` takes effect within ``poll_interval`` seconds.
        """
        self._serving_ident = threading.get_ident()
        try:
            self._httpd.serve_forever(poll_interval=poll_interval)
        finally:
            self._serving_ident = None

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection; idempotent."""
        serving_elsewhere = self._serving_ident not in (None, threading.get_ident())
        if self._thread is not None or serving_elsewhere:
            # For our own thread this is safe even if it has not entered serve_forever yet:
            # the request is remembered and serve_forever returns at once.
            self._httpd.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        with self._idle:
            # Let responses under way finish (and be logged); idle connections do not count.
            self._idle.wait_for(lambda: self._inflight == 0, timeout=5.0)
        self._httpd.close_connections()
        with self._lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- used by the handler -----------------------------------------------------------------

    def resolve(self, url_path: str) -> tuple[Path, str, bool] | None:
        """Map a request target to ``(file, name, in_data)``, or None when it must be 404.

        Only ``/cvmfs/<fqrn>/<path>`` is served. Empty, ``.`` and ``..`` segments are refused
        outright, and the resolved real path (after symlinks) must stay inside ROOT.
        """
        if url_path.startswith("/"):
            # origin-form; split by hand because urlsplit would read "//x/..." as a host name
            target = url_path.split("?", 1)[0].split("#", 1)[0]
        else:
            target = urlsplit(url_path).path  # absolute-form, as a proxy would send it
        path = unquote(target, errors="strict")
        prefix = "/cvmfs/"
        if not path.startswith(prefix) or "\x00" in path:
            return None
        parts = path[len(prefix) :].split("/")
        if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
            return None
        # Only repositories are served: ROOT/<fqrn> must hold a manifest, and the file must
        # stay inside that folder, so keys or anything else that sits under ROOT never leaks.
        repo = os.path.realpath(os.path.join(self.real_root, parts[0]))
        plain = parts[0] in self.plain_folders
        if not _inside(repo, self.real_root) or not (
            plain or os.path.isfile(os.path.join(repo, ".cvmfspublished"))
        ):
            return None
        real = os.path.realpath(os.path.join(repo, *parts[1:]))
        if not _inside(real, repo) or parts[1:3] == ["data", "txn"]:
            return None  # data/txn: a publisher's staging area, not published objects
        if _is_private_key(parts[-1]) or _is_private_key(os.path.basename(real)):
            return None
        return Path(real), parts[-1], parts[1] == "data" and not plain

    def begin(self) -> None:
        """Note a request under way, so that stop() waits for it."""
        with self._lock:
            self._inflight += 1

    def record(self, entry: RequestRecord, request_line: str) -> None:
        """Count a finished request, log it (file and callback) and release stop()."""
        try:
            self._log(entry, request_line)
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _log(self, entry: RequestRecord, request_line: str) -> None:
        with self._lock:
            self._requests += 1
            self._bytes_sent += entry.bytes
            if self._log_file is not None:
                now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                rng = "-" if entry.range is None else entry.range
                self._log_file.write(
                    f'{entry.client} - [{now}] "{_escape(request_line)}" {entry.status} '
                    f'{entry.bytes} range="{_escape(rng)}"\n'
                )
        if self.on_request is not None:
            self.on_request(entry)


def _inside(path: str, folder: str) -> bool:
    """``path`` is below ``folder`` (both real paths), not ``folder`` itself."""
    return path != folder and os.path.commonpath([path, folder]) == folder


_PRIVATE_SUFFIXES = (".key", ".masterkey", ".pem", ".crt", ".gw")


def _is_private_key(name: str) -> bool:
    """Key material names (upstream's /etc/cvmfs/keys: <fqrn>.key, .masterkey, .crt, .gw)."""
    return name.endswith(_PRIVATE_SUFFIXES)


def private_keys_under(root: Path, limit: int = 100_000) -> list[Path]:
    """Key files below ``root`` (looking at no more than ``limit`` entries; data/ is skipped).

    ``serve`` never sends them, but a web root is the wrong place for a private key: the warning
    this feeds says so.
    """
    found: list[Path] = []
    seen = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "data"]  # objects: thousands of entries, no keys
        seen += len(dirs) + len(files)
        found.extend(Path(folder) / f for f in files if f.endswith((".key", ".masterkey")))
        if seen > limit:
            break
    return sorted(found)


def _escape(text: str) -> str:
    """Escape like nginx's default log escaping, so a log line stays parseable."""
    return "".join(
        f"\\x{ord(ch):02X}" if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its :class:`RepositoryServer` and its open connections."""

    daemon_threads = True
    # Do not wait for idle keep-alive connections on close; stop() shuts them down instead.
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        app: RepositoryServer,
    ) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang for
        # seconds on a machine without DNS; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up is normal; anything else is a bug worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def close_connections(self) -> None:
        """Shut down every open connection, so its handler thread sees EOF and ends."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Answers GET and HEAD for files under the repository root."""

    protocol_version = "HTTP/1.1"
    server_version = "cvmfs-ml"
    sys_version = ""
    timeout = _IDLE_TIMEOUT
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the access log and ``on_request`` replace BaseHTTPRequestHandler's stderr log."""

    # -- the response --------------------------------------------------------------------

    def _serve(self, send_body: bool) -> None:
        app = self.server.app
        range_header = self.headers.get("Range")
        if self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            # A body we do not read would be taken for the next request: close afterwards.
            self.close_connection = True
        status, sent = HTTPStatus.NOT_FOUND, 0
        app.begin()
        try:
            info = info_document(app.root, self.path) if self.path.startswith(INFO_PREFIX) else None
            try:
                resolved = None if info is not None else app.resolve(self.path)
            except ValueError:  # also UnicodeDecodeError from bad %-escapes
                resolved = None
            if info is not None:
                status, sent = HTTPStatus.OK, self._send_json(info, send_body)
            elif resolved is None:
                sent = self._send_simple(HTTPStatus.NOT_FOUND, send_body)
            else:
                status, sent = self._send_file(*resolved, range_header, send_body)
        except (ConnectionError, TimeoutError):
            # The client went away mid-response; the connection cannot be reused.
            self.close_connection = True
        finally:
            app.record(
                RequestRecord(
                    client=str(self.client_address[0]),
                    method=self.command,
                    path=self.path,
                    status=int(status),
                    bytes=sent,
                    range=range_header,
                ),
                self.requestline,
            )

    def _send_file(
        self, path: Path, name: str, in_data: bool, range_header: str | None, send_body: bool
    ) -> tuple[HTTPStatus, int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return HTTPStatus.NOT_FOUND, self._send_simple(HTTPStatus.NOT_FOUND, send_body)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # directories are not listed
                return HTTPStatus.NOT_FOUND, self._send_simple(HTTPStatus.NOT_FOUND, send_body)
            with open(fd, "rb", buffering=0, closefd=False) as body:
                return self._send_body(body, info.st_size, name, in_data, range_header, send_body)
        finally:
            os.close(fd)

    def _send_body(
        self,
        body: IO[bytes],
        size: int,
        name: str,
        in_data: bool,
        range_header: str | None,
        send_body: bool,
    ) -> tuple[HTTPStatus, int]:
        fd = body.fileno()
        try:
            span = _parse_range(range_header, size)
        except _Unsatisfiable:
            sent = self._send_simple(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                send_body,
                [("Content-Range", f"bytes */{size}")],
            )
            return HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, sent
        content_type, cache_control = cache_headers(name, in_data)
        headers = [
            ("Content-Type", content_type),
            ("Cache-Control", cache_control),
            ("Accept-Ranges", "bytes"),
        ]
        if span is None:
            status, start, length = HTTPStatus.OK, 0, size
        else:
            status, start, length = HTTPStatus.PARTIAL_CONTENT, span[0], span[1] - span[0]
            headers.append(("Content-Range", f"bytes {start}-{span[1] - 1}/{size}"))
        headers.append(("Content-Length", str(length)))
        if not send_body or length == 0:
            self._write_head(status, headers)
            return status, 0
        if length <= _SMALL_BODY:
            data = os.pread(fd, length, start)
            if len(data) != length:
                self.close_connection = True  # the file shrank: do not reuse the connection
            self._write_head(status, headers, data)
            return status, len(data)
        self._write_head(status, headers)
        sent = self.connection.sendfile(body, start, length)
        if sent != length:
            # The file shrank while we sent it; the promised length cannot be kept.
            self.close_connection = True
        return status, sent

    def _send_json(self, body: bytes, send_body: bool) -> int:
        """A generated monitoring document (storage/info.py): short-lived like ``.cvmfs*``."""
        headers = [
            ("Content-Type", "application/json"),
            ("Cache-Control", f"max-age={MUTABLE_MAX_AGE}"),
            ("Content-Length", str(len(body))),
        ]
        self._write_head(HTTPStatus.OK, headers, body if send_body else b"")
        return len(body) if send_body else 0

    def _send_simple(
        self,
        status: HTTPStatus,
        send_body: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> int:
        body = f"{status.value} {status.phrase}\n".encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            *(extra or []),
            ("Content-Length", str(len(body))),
        ]
        self._write_head(status, headers, body if send_body else b"")
        return len(body) if send_body else 0

    def _write_head(
        self, status: HTTPStatus, headers: list[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Write the status line, headers and (optionally) a small body in one ``sendall``."""
        lines = [
            f"{self.protocol_version} {status.value} {status.phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            *(f"{key}: {value}" for key, value in headers),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body)
