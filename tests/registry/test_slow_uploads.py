"""Upload bodies that trickle or stall, from a raw socket against the real registry process.

Before, a client that sent its body a byte now and then, or stopped sending without closing the
connection, held its request and the spool or upload file it had filled for as long as it
liked. Now each upload API answers 408 in its own form once the body is slower than
``upload_low_speed_limit`` over ``upload_low_speed_seconds``; a user-pub body is discarded, an
OCI upload session keeps what arrived (it can be resumed).
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from ._helpers import HTTP, RegistryEnv, wait_until

WINDOW = 1.5  # seconds; the limit is 1000 B/s over each window


def _send_slowly(port: int, head: str, body: bytes, pause: float) -> tuple[str, bytes]:
    """Send ``head`` then ``body`` 10 bytes per ``pause`` (none at all when ``pause`` is
    negative: the client stalls); the status line and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        sock.settimeout(0.01)
        answer = b""
        while time.monotonic() - started < 60 and b"\r\n\r\n" not in answer:
            if pause >= 0 and body:
                try:
                    sock.sendall(body[:10])
                except OSError:
                    pass  # the server closed its side: read its answer
                body = body[10:]
            try:
                answer += sock.recv(65536) or b""
            except TimeoutError:
                time.sleep(max(pause, 0.05))
        sock.settimeout(5)
        while True:  # the rest of the answer, up to the close
            try:
                more = sock.recv(65536)
            except OSError:
                break
            if not more:
                break
            answer += more
        seconds = time.monotonic() - started
    status, _, rest = answer.partition(b"\r\n")
    assert seconds < 30, seconds  # a few windows, not as long as the client likes
    return status.decode(), rest.partition(b"\r\n\r\n")[2]


@pytest.fixture
def slow_env(registry_env: RegistryEnv) -> RegistryEnv:
    registry_env.set_config(upload_low_speed_limit=1000, upload_low_speed_seconds=WINDOW)
    return registry_env


@pytest.mark.parametrize("pause", [0.5, -1.0], ids=["trickle", "stall"])
def test_a_user_pub_body_too_slow_is_refused_and_discarded(
    slow_env: RegistryEnv, pause: float
) -> None:
    server = slow_env.start()
    head = (
        "POST /pubapi/publish?cid=grp/slow HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {slow_env.tokens['writer']}\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    status, body = _send_slowly(server.port, head, b"x" * 100000, pause)
    assert " 408 " in status, (status, body)
    assert b"send it again" in body
    wait_until(lambda: not list((slow_env.data / "spool").glob("*.upload")), 60)
    ping = HTTP.request("GET", f"{server.url}/pubapi/ping")
    assert ping.status == 200  # the server goes on serving


def test_an_oci_chunk_too_slow_is_refused_and_the_session_keeps_what_came(
    slow_env: RegistryEnv,
) -> None:
    server = slow_env.start()
    auth = {"Authorization": f"Bearer {slow_env.tokens['writer']}"}
    start = HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/", headers=auth)
    assert start.status == 202
    location = start.headers["Location"]
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
        "Content-Range: 0-99999\r\nContent-Length: 100000\r\n\r\n"
    )
    status, body = _send_slowly(server.port, head, b"y" * 100000, 0.5)
    assert " 408 " in status, (status, body)
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    state = HTTP.request("GET", f"{server.url}{location}", headers=auth)
    assert state.status == 204
    kept = int(state.headers["Range"].split("-")[1]) + 1 if "Range" in state.headers else 0
    assert 0 < kept < 100000  # what arrived before the refusal, to resume from
