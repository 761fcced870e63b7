"""The pools every HTTP fetch goes through, over plain HTTP and TLS, against a real server on
loopback: headers get one read timeout in all (a server trickling them fails in bounded time,
one taking its time within it does not), bodies and kept-alive connections are untouched."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cvmfs_ml.client.http_pools import HeaderTimeout, pool_manager
from quiet_http import QuietHTTPServer

BODY = hashlib.sha256(b"seed").digest() * (3 * 2**20 // 32)  # 3 MiB


class _Server(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[tuple[str, int]]

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.connections.add(self.client_address)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        try:
            if self.path == "/trickle":  # never finished, a byte well within each timeout
                for byte in head[:-2] + b"X-Slow: " + b"a" * 400:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            if self.path == "/pauses":  # the headers in three parts, done within the timeout
                for part in (head[:9], head[9:20], head[20:]):
                    self.wfile.write(part)
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(head)
            self.wfile.write(BODY)
        except OSError:
            return  # the client gave up, as it should


def _certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, _Server, Path]]:
    """(base URL, handler class, CA file): a threaded server, with TLS for ``https``."""
    handler = type("Handler", (_Server,), {"connections": set()})
    httpd = QuietHTTPServer(("127.0.0.1", 0), handler)
    cert, key = _certificate(tmp_path)
    if request.param == "https":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"{request.param}://127.0.0.1:{httpd.server_address[1]}", handler, cert
    finally:
        httpd.shutdown()
        httpd.server_close()


def _manager(cert: Path, read: float) -> urllib3.PoolManager:
    return pool_manager(
        retries=False, timeout=urllib3.Timeout(connect=5, read=read), ca_certs=str(cert),
    )  # fmt: skip


def test_bodies_and_kept_alive_connections_are_untouched(
    server: tuple[str, _Server, Path],
) -> None:
    url, handler, cert = server
    manager = _manager(cert, read=10)  # the pauses take 0.4 s: a wide margin under load
    for path in ("/a", "/b", "/pauses"):  # one connection for all three, kept alive
        response = manager.request("GET", url + path, preload_content=False)
        got = bytearray()
        while chunk := response.read(1 << 16):
            got += chunk
        response.release_conn()
        assert response.status == 200 and bytes(got) == BODY
    assert len(handler.connections) == 1


def test_headers_trickled_forever_fail_within_one_timeout(
    server: tuple[str, _Server, Path],
) -> None:
    url, _handler, cert = server
    start = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError) as caught:
        _manager(cert, read=2).request("GET", url + "/trickle")
    assert isinstance(caught.value.__cause__, HeaderTimeout)
    assert time.monotonic() - start < 10  # 2 s of headers, not 400 bytes at 0.3 s each
