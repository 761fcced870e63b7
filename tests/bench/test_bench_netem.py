"""DelayProxy: latency per round trip, handshake cost, rate caps, backpressure, clean shutdown.

Servers here are in-process socket servers on loopback; sizes are small so the file runs in a
few seconds. Timing assertions use lower bounds (what the emulation guarantees) and generous
upper bounds (what a shared 2-core machine can still meet).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cvmfs_ml.testing.netem import (
    WAN_PROFILES,
    DelayProxy,
    WanProfile,
    describe,
    tc_netem_available,
)
from quiet_http import QuietTCPServer

_ZEROS = memoryview(bytes(1 << 20))


class _Handler(socketserver.BaseRequestHandler):
    """``echo <text>\\n`` answers the line; ``get <n>\\n`` answers n zero bytes."""

    def handle(self) -> None:
        for line in self.request.makefile("rb"):
            verb, arg = line.split(maxsplit=1)
            if verb == b"echo":
                self.request.sendall(line)
            else:
                n = int(arg)
                while n > 0:
                    k = min(n, len(_ZEROS))
                    self.request.sendall(_ZEROS[:k])
                    n -= k


class _Server(QuietTCPServer):
    allow_reuse_address = True


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _echo(sock: socket.socket) -> float:
    start = time.perf_counter()
    sock.sendall(b"echo ping\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, "connection closed"
        got += chunk
    assert got == b"echo ping\n"
    return time.perf_counter() - start


def _get(port: int, n: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"get %d\n" % n)
        buf = bytearray(1 << 20)
        got = 0
        while got < n:
            r = sock.recv_into(buf, min(len(buf), n - got))
            assert r, "connection closed early"
            got += r
    return got


def test_round_trip_takes_at_least_the_rtt(server: int) -> None:
    # RTTs are large so that a loaded machine's scheduling delays (tens of ms) cannot reach
    # the next RTT: each bound separates "one RTT" from "two RTTs", whatever the load.
    with socket.create_connection(("127.0.0.1", server)) as direct:
        assert min(_echo(direct) for _ in range(3)) < 0.1  # one slow scheduling is no delay
    with (
        DelayProxy("127.0.0.1", server, rtt_ms=200) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        first = _echo(sock)  # includes the emulated TCP handshake
        later = [_echo(sock) for _ in range(3)]
    assert first >= 0.400
    assert all(0.200 <= t < 0.390 for t in later), later


def test_handshake_can_be_disabled(server: int) -> None:
    with (
        DelayProxy("127.0.0.1", server, rtt_ms=200, model_handshake=False) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        first = _echo(sock)
    assert 0.200 <= first < 0.390  # one RTT, not two


def test_throughput_is_not_one_read_per_round_trip(server: int) -> None:
    # A stop-and-wait relay with 1 MiB reads would need 16 x 300 ms = 4.8 s here; a pipelined
    # one about one RTT plus the copy, which leaves seconds of slack for a loaded machine.
    with DelayProxy("127.0.0.1", server, rtt_ms=300) as proxy:
        start = time.perf_counter()
        assert _get(proxy.port, 16 << 20) == 16 << 20
        elapsed = time.perf_counter() - start
    assert 0.3 <= elapsed < 3.0


def test_rate_cap_limits_one_connection(server: int) -> None:
    n, cap = 8 << 20, 20e6
    with DelayProxy("127.0.0.1", server, rtt_ms=2, rate_bytes_per_s=cap) as proxy:
        start = time.perf_counter()
        _get(proxy.port, n)
        elapsed = time.perf_counter() - start
        stats = proxy.stats()
    assert elapsed >= 0.8 * n / cap
    assert elapsed < 4 * n / cap + 1.5  # the cap is a limit, not a target missed by far
    assert stats["bytes_down"] >= n


def test_per_connection_cap_scales_with_connections(server: int) -> None:
    # A slow cap makes the time the cap's, not the CPU's: one connection needs n / cap = 1 s,
    # three sharing one cap would need 3.1 s; three with a cap each, about 1 s (the bound
    # between leaves a loaded machine a second).
    n, cap = 2 << 20, 2e6
    with DelayProxy("127.0.0.1", server, rtt_ms=2, rate_bytes_per_s=cap) as proxy:
        start = time.perf_counter()
        with ThreadPoolExecutor(3) as pool:
            assert sum(pool.map(lambda _: _get(proxy.port, n), range(3))) == 3 * n
        elapsed = time.perf_counter() - start
    assert 0.8 * n / cap <= elapsed < 2 * n / cap


def test_link_cap_is_shared(server: int) -> None:
    n, cap = 2 << 20, 20e6
    with DelayProxy("127.0.0.1", server, rtt_ms=2, link_rate_bytes_per_s=cap) as proxy:
        start = time.perf_counter()
        with ThreadPoolExecutor(3) as pool:
            assert sum(pool.map(lambda _: _get(proxy.port, n), range(3))) == 3 * n
        elapsed = time.perf_counter() - start
    assert elapsed >= 0.8 * 3 * n / cap


def test_small_buffer_applies_backpressure(server: int) -> None:
    # the delay line holds at most 1 MiB for 50 ms: at most ~20 MB/s
    n = 8 << 20
    with DelayProxy("127.0.0.1", server, rtt_ms=100, max_buffer_bytes=1 << 20) as proxy:
        start = time.perf_counter()
        _get(proxy.port, n)
        elapsed = time.perf_counter() - start
    assert elapsed >= 0.2


def test_half_close_and_stop(server: int) -> None:
    proxy = DelayProxy("127.0.0.1", server, rtt_ms=10)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    proxy.start()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"echo bye\n")
    sock.shutdown(socket.SHUT_WR)  # the server sees EOF after the line and closes
    data = b""
    sock.settimeout(5)
    while chunk := sock.recv(100):
        data += chunk
    assert data == b"echo bye\n"
    sock.close()
    idle = socket.create_connection(("127.0.0.1", proxy.port))
    proxy.stop()
    idle.settimeout(5)
    try:
        assert idle.recv(10) == b""  # stop() closed the open connection
    except ConnectionResetError:
        pass
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_unreachable_target_closes_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # bound but never listening: connections are refused
        with DelayProxy("127.0.0.1", dead_port, rtt_ms=1) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port))
            client.settimeout(5)
            try:
                assert client.recv(10) == b""
            except ConnectionResetError:
                pass
            client.close()


def test_profiles_and_descriptions(server: int) -> None:
    assert WAN_PROFILES["loopback"] is None
    assert WAN_PROFILES["wan-20ms-1g"] == WanProfile(20, 125e6)
    assert WAN_PROFILES["wan-20ms-cap84MBps"].per_connection  # type: ignore[union-attr]
    proxy = DelayProxy.from_profile("wan-20ms-cap84MBps", "127.0.0.1", server)
    assert proxy.rate == 84e6 and proxy.link_rate is None and proxy.rtt == pytest.approx(0.02)
    linked = DelayProxy.from_profile("wan-100ms-100m", "127.0.0.1", server)
    assert linked.link_rate == 12.5e6 and linked.rate is None
    latency_only = DelayProxy.from_profile("wan-20ms", "127.0.0.1", server)
    assert latency_only.rtt == pytest.approx(0.02)
    assert latency_only.rate is None and latency_only.link_rate is None
    assert "MB/s" not in latency_only.describe() and "MB/s" not in describe("wan-20ms")
    assert "84 MB/s per connection" in proxy.describe()
    assert isinstance(tc_netem_available(), bool)
    text = describe("wan-20ms-1g")
    assert "rtt 20 ms" in text and "DelayProxy" in text and "netem" in text
    with (
        DelayProxy.from_profile("loopback", "127.0.0.1", server) as fast,
        socket.create_connection(("127.0.0.1", fast.port)) as sock,
    ):
        assert min(_echo(sock) for _ in range(3)) < 0.05  # the fastest of three: no delay added
