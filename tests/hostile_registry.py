"""A registry on loopback that serves whatever a test puts in it, however malformed.

docker-registry checks what is pushed to it (a manifest whose ``size`` has 5000 digits, or whose
config declares a GiB it does not have, never gets in), so the tests of what a hostile registry
may send serve those documents from here: ``GET /v2/<repository>/manifests/<tag or digest>`` and
``GET /v2/<repository>/blobs/<digest>``, 404 for anything else. Every path asked for is kept in
:attr:`HostileRegistry.requests`, so a test can tell that a blob was refused *before* it was
downloaded.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from typing import Any

from quiet_http import QuietHTTPServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        registry = self.server.registry
        path = self.path.split("?", 1)[0]
        with registry.lock:
            registry.requests.append(path)
        if path in ("/v2", "/v2/"):
            return self._answer(200, b"{}", "application/json")
        head = kind = ref = ""
        parts = path.split("/")
        if len(parts) >= 5 and parts[-2] in ("manifests", "blobs"):
            head, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if ref in registry.bodies:
            return self._flood(ref, *registry.bodies[ref])
        if kind == "manifests" and (head, ref) in registry.manifests:
            body, media_type = registry.manifests[(head, ref)]
            if ref in registry.trickled:
                return self._trickle(body, media_type, registry.trickled[ref])
            if ref in registry.truncated:  # half of it, then the connection closes
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return None
            return self._answer(200, body, media_type)
        if kind == "blobs" and ref in registry.redirects:
            self.send_response(307)
            self.send_header("Location", registry.redirects[ref])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if kind == "blobs" and ref in registry.silent:  # the request read, never answered
            registry.release.wait(timeout=60)
            self.close_connection = True
            return None
        if kind == "blobs" and ref in registry.stalled:  # half the bytes, then nothing
            body = registry.blobs[ref]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            registry.release.wait(timeout=60)
            return None
        if kind == "blobs" and ref in registry.blobs:
            return self._answer(200, registry.blobs[ref], "application/octet-stream")
        return self._answer(404, b'{"errors": [{"code": "UNKNOWN"}]}', "application/json")


    def _trickle(self, body: bytes, media_type: str, seconds: float) -> None:
        """``body``, a byte every ``seconds``, until it is sent or the test ends."""
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        try:
            for n in range(len(body)):
                self.wfile.write(body[n : n + 1])
                self.wfile.flush()
                if self.server.registry.release.wait(seconds):
                    return
        except OSError:
            return  # the client went away

    def _flood(self, ref: str, status: int, size: int | None) -> None:
        """Answer ``status`` with ``size`` zero bytes (None: chunked, without end), counted in
        ``registry.sent[ref]``, until the client goes away or the test ends."""
        registry = self.server.registry
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if ref in registry.retry_after:
            self.send_header("Retry-After", registry.retry_after[ref])
        if size is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        piece = bytes(1 << 16)
        left = size
        self.close_connection = True
        try:
            while not registry.release.is_set() and (left is None or left > 0):
                data = piece if left is None else piece[: min(len(piece), left)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if size is None else data)
                with registry.lock:
                    registry.sent[ref] = registry.sent.get(ref, 0) + len(data)
                if left is not None:
                    left -= len(data)
        except OSError:
            return  # the client went away


class _Server(QuietHTTPServer):
    registry: HostileRegistry


class HostileRegistry:
    """Serves :attr:`manifests` (``{(repository, tag or digest): (bytes, media type)}``) and
    :attr:`blobs` (``{digest: bytes}``) over plain HTTP on 127.0.0.1; use as a context manager."""

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.stalled: set[str] = set()  # blobs sent half-way, then held until ``release``
        self.silent: set[str] = set()  # blobs whose request gets no answer until ``release``
        # {tag or digest: (status, body size or None for endless)}: answered with that many
        # zero bytes; how many went out is counted in ``sent``
        self.bodies: dict[str, tuple[int, int | None]] = {}
        self.sent: dict[str, int] = {}
        self.retry_after: dict[str, str] = {}  # the Retry-After header of those answers
        self.redirects: dict[str, str] = {}  # blobs answered 307 to this URL
        self.trickled: dict[str, float] = {}  # manifest tags or digests: seconds per byte
        self.truncated: set[str] = set()  # manifest tags or digests sent half-way, then closed
        self.release = threading.Event()
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.registry = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HostileRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Serve ``data``; its descriptor."""
        self.blobs[digest_of(data)] = data
        return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}

    def manifest(self, repository: str, tag: str, body: bytes | dict[str, Any]) -> str:
        """Serve ``body`` (bytes as they are, or a document as JSON) under ``tag`` and its
        digest; returns the digest."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        entry = (raw, OCI_MANIFEST)
        self.manifests[(repository, tag)] = entry
        self.manifests[(repository, digest_of(raw))] = entry
        return digest_of(raw)

    def asked_for(self, digest: str) -> bool:
        """Whether blob ``digest`` was requested."""
        with self.lock:
            return any(path.endswith(f"/blobs/{digest}") for path in self.requests)


def image_manifest(config: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
