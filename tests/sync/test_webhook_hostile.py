"""The sync webhook against hostile senders on loopback: bytes trickled to dodge the per-read
timeout, connection floods, resets mid-body, cut bodies and event floods. Each is refused or
dropped within a bound, prints no traceback, and leaves the server answering the next sender.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import urllib3

from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync import webhook
from cvmfs_ml.sync.loop import SyncLoop
from cvmfs_ml.sync.webhook import RegistryEvent, WebhookServer
from waiting import wait_until

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=60))


class _Counting(WebhookServer):
    """The webhook server, counting its own connection threads: other servers' threads (an
    earlier test's keep-alive connection, still open) are none of its business."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handlers = 0
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            self.handlers += 1
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.handlers -= 1


def _trickle(server: WebhookServer, head: bytes, piece: bytes, closed: threading.Event) -> None:
    """Send ``head``, then ``piece`` every 0.2 s until the server hangs up (or 10 minutes)."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(head)
        for _ in range(3000):
            try:
                sock.sendall(piece)
                sock.settimeout(0.2)
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
    closed.set()


@pytest.mark.parametrize(
    "head, piece",
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b" "),
        (b"POST / HTTP/1.1\r\nHost: x\r\nX-Long: ", b"a"),  # headers that never end
    ],
    ids=["body", "headers"],
)
def test_a_trickling_sender_is_dropped_at_the_request_deadline(head: bytes, piece: bytes) -> None:
    """One byte every 0.2 s never trips a 2 s per-read timeout; before, such a sender held its
    connection and thread for the 100,000 s its body took. The deadline is 3 s for all of it."""
    received: list[Any] = []
    server = WebhookServer(received.extend, read_timeout=2, request_timeout=3).start()
    try:
        closed = threading.Event()
        thread = threading.Thread(target=_trickle, args=(server, head, piece, closed), daemon=True)
        thread.start()
        wait_until(closed.is_set, 90, "the server hanging up on the trickling sender")
        assert HTTP.request("POST", server.url, body=b'{"events": []}').status == 202
        assert not received
    finally:
        server.stop()


def test_a_connection_flood_is_answered_busy_without_threads() -> None:
    server = _Counting(lambda _: None, read_timeout=60, request_timeout=120, max_connections=4)
    server.start()
    idle = []
    try:
        for _ in range(4):  # each holds a slot: headers started, never finished
            sock = socket.create_connection(server.server_address[:2], timeout=30)
            sock.sendall(b"POST / HTTP/1.1\r\n")
            idle.append(sock)
        wait_until(lambda: server.handlers >= 4, 60, "four connections being served")

        def refused() -> bool:
            return HTTP.request("POST", server.url, body=b"{}").status == 503

        wait_until(refused, 60, "a fifth sender told 503", ignore=(urllib3.exceptions.HTTPError,))
        assert server.handlers == 4  # no thread was started for it
        for sock in idle:
            sock.close()
        wait_until(lambda: HTTP.request("POST", server.url, body=b'{"events": []}').status == 202,
                   60, "senders served again once the flood is gone")  # fmt: skip
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_a_reset_mid_body_prints_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """socketserver printed 'Exception occurred during processing of request' and a traceback
    of ConnectionResetError to the sync service's stderr for every such sender."""
    server = _Counting(lambda _: None, read_timeout=30)
    server.start()
    try:
        wait_until(lambda: not server.handlers, 60, "no connection being served")
        sock = socket.create_connection(server.server_address[:2], timeout=30)
        sock.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"ev')
        wait_until(lambda: server.handlers, 60, "the server reading the body")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        wait_until(lambda: not server.handlers, 60, "the reset connection's handler ending")
        assert HTTP.request("POST", server.url, body=b'{"events": []}').status == 202
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_cut_bodies_and_event_floods_are_400s() -> None:
    received: list[Any] = []
    server = WebhookServer(received.extend, read_timeout=30).start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=30) as sock:
            sock.sendall(b'POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"events": []}')
            sock.shutdown(socket.SHUT_WR)  # 14 of the 1000 bytes, then the end
            answer = b""
            while piece := sock.recv(4096):
                answer += piece
        assert answer.startswith(b"HTTP/1.0 400") and b"shorter than its Content-Length" in answer

        push = {"action": "push", "target": {"repository": "lib/app", "tag": "v1"}}
        same = HTTP.request("POST", server.url, body=json.dumps({"events": [push] * 10000}))
        assert same.status == 202 and len(received) == 1  # one event, not 10,000 log lines

        many = [{"action": "push", "target": {"repository": f"r/{i}", "tag": "t"}}
                for i in range(getattr(webhook, "MAX_EVENTS", 1000) + 1)]  # fmt: skip
        flood = HTTP.request("POST", server.url, body=json.dumps({"events": many}))
        assert flood.status == 400 and b"more than" in flood.data and len(received) == 1
    finally:
        server.stop()


def test_notifications_during_a_long_round_take_bounded_memory(
    publisher: Publisher, tmp_path: Path
) -> None:
    """The loop remembered every repository notified while a round ran (a set that grew by up
    to 1000 per request, for as long as the round took); past a bound it runs a full round,
    which covers them all, instead."""
    loop = SyncLoop(publisher, tmp_path / "wishlist.yaml", interval=3600.0)

    def flood(batch: int) -> None:
        loop.notify([RegistryEvent("push", f"r/{batch}/{i}", "t") for i in range(1000)])

    tracemalloc.start()
    try:
        for batch in range(50):  # the event log keeps its latest 10,000 events: full by now
            flood(batch)
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(50, 150):
            flood(batch)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2**20, f"{grown} bytes more after 100,000 more notified repositories"
