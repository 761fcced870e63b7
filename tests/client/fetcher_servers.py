"""The real loopback servers the fetcher tests run against (test_fetcher*.py): an origin serving
the reference repository written by upstream ``cvmfs_server``, hosts that answer 404/500/429/302,
forward proxies that relay, corrupt, truncate, refuse or stall. Their fixtures are in conftest.py.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
import zlib
from pathlib import Path

from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import parse_object_path
from quiet_http import QuietHTTPServer

FIXTURE = Path("/work/shared/fixtures/cvmfs-reference-repo")
REPO_DIR = FIXTURE / "cvmfs" / "ref.test.local"
FQRN = "ref.test.local"
# Timeouts a loaded machine never reaches on loopback (tests of timeouts set their own).
FAST = {"backoff_init": 0.01, "backoff_max": 0.02, "timeout": 10.0, "timeout_direct": 10.0}


def reference_objects() -> list[tuple[str, Digest, bytes]]:
    """(relative path, digest, decompressed content) of every object in the reference repo."""
    out = []
    for path in sorted((REPO_DIR / "data").rglob("*")):
        if path.is_file():
            rel = path.relative_to(REPO_DIR).as_posix()
            digest, _kind = parse_object_path(rel)
            out.append((rel, digest, zlib.decompress(path.read_bytes())))
    return out


OBJECTS = reference_objects()
BIGGEST = max(OBJECTS, key=lambda o: len(o[2]))


# ---------------------------------------------------------------- servers


class Server:
    """A threaded HTTP server on loopback that records what it was asked."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], **attrs: object) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.released = threading.Event()  # ends the stalls of ``hang`` proxies
        cls = type("Handler", (handler,), {"state": self, **attrs})
        self.httpd = QuietHTTPServer(("127.0.0.1", 0), cls)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    @property
    def repo_url(self) -> str:
        return f"{self.address}/cvmfs/{FQRN}"

    def record(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((handler.path, dict(handler.headers.items())))

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Recording(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # otherwise delayed ACKs cost 40 ms per response
    state: Server

    def setup(self) -> None:
        with self.state.lock:
            self.state.connections += 1
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Origin(Recording, http.server.SimpleHTTPRequestHandler):
    """Serves the reference repository as a Stratum 0 web root (/cvmfs/<fqrn>/...)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, directory=str(FIXTURE), **kwargs)  # type: ignore[misc]

    def do_GET(self) -> None:
        self.state.record(self)
        super().do_GET()

    def copyfile(self, source: object, outputfile: object) -> None:
        self.connection.sendfile(source)  # type: ignore[arg-type]


class Fixed(Recording):
    """Answers every request with ``status`` (and ``extra`` headers)."""

    status = 404
    extra: dict[str, str] = {}  # noqa: RUF012

    def do_GET(self) -> None:
        self.state.record(self)
        self.reply(self.status, b"no", self.extra)


class Redirect(Recording):
    target = ""

    def do_GET(self) -> None:
        self.state.record(self)
        path = self.path.split("/cvmfs/", 1)[1]
        self.reply(302, b"", {"Location": f"{self.target}/cvmfs/{path}"})


class Proxy(Recording):
    """A forward proxy (absolute-URI requests) with a fault ``mode``."""

    mode = "pass"

    def do_GET(self) -> None:
        self.state.record(self)
        nocache = self.headers.get("Cache-Control") == "no-cache"
        if self.mode == "forbidden":
            self.reply(403, b"denied")
            return
        if self.mode == "squid-error":
            self.reply(503, b"", {"X-Squid-Error": "ERR_CONNECT_FAIL 111"})
            return
        if self.mode == "hang":  # stalls until the test is over: only a timeout ends it
            self.state.released.wait(60)
            self.close_connection = True
            return
        target = urllib.parse.urlsplit(self.path)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
        conn.request("GET", target.path)
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
        if status == 200 and (self.mode == "corrupt" or (self.mode == "stale" and not nocache)):
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        if status == 200 and self.mode == "truncate":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.reply(status, body)


def start(servers: list[Server], handler: type[Recording], **attrs: object) -> Server:
    server = Server(handler, **attrs)
    servers.append(server)
    return server


def hits(server: Server, rel: str) -> list[dict[str, str]]:
    return [headers for path, headers in server.requests if path.endswith(rel)]
