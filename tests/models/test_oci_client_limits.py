"""The OCI client against a registry that misbehaves on purpose (a real HTTP server on loopback):
a blob trickled slower than the low-speed limit fails in bounded time (the read timeout alone
never ends a server that sends a little now and then), and a token answer without end is cut
off at 1 MiB instead of filling memory."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.errors import DownloadError, FormatError
from cvmfs_ml.models.sources.oci_client import RegistryClient
from quiet_http import QuietHTTPServer

BLOB = bytes(range(256)) * 256  # 64 KiB: 32 s when trickled, so "failed early" has margin
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "fast"
    pages = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if "/tags/list" in self.path:
            self._tags_page()
            return
        if self.path.startswith("/token"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                self.wfile.write(b'{"token": "')
                for _ in range(64):  # 64 MiB of token, if anyone read it all
                    self.wfile.write(b"x" * (1 << 20))
            except OSError:
                pass  # the client hung up, as it should
            return
        if self.mode == "slow-headers":  # headers a byte at a time, never finished
            try:
                for byte in b"HTTP/1.1 200 OK\r\nX-Trickle: " + b"a" * 600:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)  # within the 1 s read timeout, every time
            except OSError:
                pass
            return
        if self.mode == "auth" and "Authorization" not in self.headers:
            realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        if self.mode != "trickle":
            self.wfile.write(BLOB)
            return
        try:
            for at in range(0, len(BLOB), 20):  # 20 bytes every 0.1 s: 200 B/s
                self.wfile.write(BLOB[at : at + 20])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


    def _tags_page(self) -> None:
        """Pages that never end: each links to a next one, and brings no tag not seen before
        (``empty``: none at all; ``same``: the same one again)."""
        type(self).pages += 1
        tags = [] if self.mode == "empty" else ["v1"]
        body = json.dumps({"name": "m", "tags": tags}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Link", f'</v2/m/tags/list?n=1&last=x{self.pages}>; rel="next"')
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def registry() -> Iterator[tuple[http.server.ThreadingHTTPServer, str]]:
    server = QuietHTTPServer(("127.0.0.1", 0), _Misbehaving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _client(host: str) -> RegistryClient:
    return RegistryClient(host, plain_http=True, timeout=1.0, retries=0, low_speed_limit=4096)


def test_a_fast_blob_passes(registry: tuple[http.server.ThreadingHTTPServer, str],
                            tmp_path: Path) -> None:  # fmt: skip
    _server, host = registry
    _Misbehaving.mode = "fast"
    dest = _client(host).fetch_blob("lib/x", DIGEST, tmp_path / "b", size=len(BLOB))
    assert dest.read_bytes() == BLOB


@pytest.mark.parametrize("how", ["stream", "file"])
def test_a_trickled_blob_fails_in_bounded_time(
    registry: tuple[http.server.ThreadingHTTPServer, str], tmp_path: Path, how: str
) -> None:
    _server, host = registry
    _Misbehaving.mode = "trickle"  # the whole blob would take 32 s at 200 B/s
    client = _client(host)
    start = time.monotonic()
    with pytest.raises(DownloadError, match="low-speed limit=4096 B/s"):
        if how == "file":
            client.fetch_blob("lib/x", DIGEST, tmp_path / "b", size=len(BLOB))
        else:
            with client.open_blob("lib/x", DIGEST, size=len(BLOB)) as blob:
                blob.finish()
    assert time.monotonic() - start < 20  # one window (1 s) and a read, not the whole 32 s
    assert not (tmp_path / "b").exists()


def test_headers_trickled_forever_fail_in_bounded_time(
    registry: tuple[http.server.ThreadingHTTPServer, str], tmp_path: Path
) -> None:
    """A registry (or a proxy before it) sending its headers a byte every half second: each
    byte restarted the read timeout, so a sync round waited for it forever."""
    _server, host = registry
    _Misbehaving.mode = "slow-headers"
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        _client(host).fetch_blob("lib/x", DIGEST, tmp_path / "b", size=len(BLOB))
    assert time.monotonic() - start < 20
    assert not (tmp_path / "b").exists()


def test_an_endless_token_answer_is_cut_off(
    registry: tuple[http.server.ThreadingHTTPServer, str],
) -> None:
    import resource

    _server, host = registry
    _Misbehaving.mode = "auth"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DownloadError, match="token answer over 1 MiB"):
        _client(host).get_manifest("lib/x", "v1")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 32  # the 64 MiB answer was not read whole


@pytest.mark.parametrize("mode", ["empty", "same"])
def test_tag_list_pages_without_end_are_refused(
    registry: tuple[http.server.ThreadingHTTPServer, str], mode: str
) -> None:
    """Before, pages with no tags that link to another page were followed forever (and pages
    repeating one tag 10,000 times): ``sync`` of that image never finished its round."""
    server, host = registry
    handler = server.RequestHandlerClass
    handler.mode, handler.pages = mode, 0  # type: ignore[attr-defined]
    with pytest.raises(FormatError, match="no tag not seen before"):
        _client(host).list_tags("m")
    assert handler.pages <= 2  # type: ignore[attr-defined]
