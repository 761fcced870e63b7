"""Network emulation for the benchmarks: an asyncio TCP delay line with rate caps.

The benchmark kernels have no ``sch_netem`` (performance-notes.md: ``tc qdisc add dev lo root
netem`` fails with "Specified qdisc kind is unknown"), so latency and bandwidth limits are added
in userspace: :class:`DelayProxy` listens on loopback and forwards every TCP connection to a
target (nginx, squid, a registry), holding each piece of data for ``rtt/2`` in each direction.

It is a *delay line*, not a stop-and-wait relay: data that arrives at time t leaves at
t + rtt/2 while later data keeps arriving, so a connection can carry up to
``max_buffer_bytes / (rtt/2)`` per second rather than one read per round trip. Reading stops
when that buffer is full (backpressure), which makes the buffer behave like a TCP window.
Bandwidth is limited with token buckets: per connection (a per-stream WAN cap, the usual limit
of a single HTTP download) and/or shared by all connections of the proxy (the link).

A fresh connection also pays the TCP handshake: nothing is forwarded earlier than one RTT after
the client connected, so a first request costs two round trips, as on a real network. The
model leaves out loss, jitter and congestion-window growth.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import shutil
import subprocess
import threading
from types import TracebackType
from typing import Any, NamedTuple

__all__ = ["WAN_PROFILES", "DelayProxy", "WanProfile", "describe", "tc_netem_available"]

_READ_SIZE = 1024 * 1024  # bytes per recv(): large reads keep the per-byte cost low
_WRITE_HIGH_WATER = 4 * 1024 * 1024
_MIN_SLICE = 64 * 1024
_SLICE_SECONDS = 0.005  # a capped pipe waits until it may send this much of its rate at once
_BURST_SECONDS = 0.05  # a bucket holds this much: late timer wake-ups are caught up, not lost
_DEFAULT_BUFFER = 64 * 1024 * 1024


class WanProfile(NamedTuple):
    """A network to emulate: round-trip time and a bandwidth limit in bytes per second.

    ``per_connection`` says whether the cap applies to each TCP connection (a per-stream limit)
    or to all connections together (the link).
    """

    rtt_ms: float
    rate_bytes_per_s: float | None
    per_connection: bool = False


WAN_PROFILES: dict[str, WanProfile | None] = {
    "loopback": None,
    "lan-1ms-10g": WanProfile(1, 1.25e9),
    "wan-20ms-1g": WanProfile(20, 125e6),
    # Latency alone (bench_read.py's rtt20): where a load's time over 20 ms is not set by the
    # link's bandwidth, as issue 13's "first load over 20 ms <= 1.3x local disk" needs.
    "wan-20ms": WanProfile(20, None),
    "wan-100ms-100m": WanProfile(100, 12.5e6),
    "wan-20ms-cap84MBps": WanProfile(20, 84e6, per_connection=True),
}


class _Bucket:
    """A token bucket on the loop's clock; only the loop thread touches it."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.slice = max(_MIN_SLICE, rate * _SLICE_SECONDS)
        self.burst = max(2 * self.slice, rate * _BURST_SECONDS)
        self.tokens = self.slice  # a new connection starts paced, not with a full burst
        self.stamp = now

    def available(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` tokens are there (after :meth:`available` was called)."""
        return max(0.0, (amount - self.tokens) / self.rate)


class _Pipe:
    """One direction of one connection: a timestamped queue between two transports."""

    def __init__(self, conn: _Connection, buckets: list[_Bucket], not_before: float) -> None:
        self.conn = conn
        self.loop = conn.proxy.loop
        self.delay = conn.proxy.delay
        self.max_buffer = conn.proxy.max_buffer
        self.buckets = buckets
        self.not_before = not_before
        self.queue: collections.deque[tuple[float, memoryview | None]] = collections.deque()
        self.buffered = 0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.src_paused = False
        self.dst_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False
        self.forwarded = 0

    def feed(self, data: bytes) -> None:
        release = max(self.loop.time() + self.delay, self.not_before)
        self.queue.append((release, memoryview(data)))
        self.buffered += len(data)
        if self.buffered >= self.max_buffer and not self.src_paused and self.src is not None:
            self.src_paused = True
            self.src.pause_reading()
        self.kick()

    def feed_eof(self) -> None:
        self.queue.append((max(self.loop.time() + self.delay, self.not_before), None))
        self.kick()

    def kick(self) -> None:
        if self.timer is None and self.dst is not None and not self.dst_paused:
            self.pump()

    def _later(self, when: float) -> None:
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.pump()

    def pump(self) -> None:
        """Write everything that is due, as far as the rate and the destination allow."""
        dst = self.dst
        if dst is None or self.finished:
            return
        now = self.loop.time()
        while self.queue and not self.dst_paused:
            release, data = self.queue[0]
            if release > now:
                self._later(release)
                return
            if data is None:
                self.queue.popleft()
                self.finished = True
                if dst.can_write_eof():
                    dst.write_eof()
                self.conn.pipe_finished()
                return
            n = len(data)
            if self.buckets:
                avail = min(b.available(now) for b in self.buckets)
                want = min(n, min(b.slice for b in self.buckets))  # each burst >= it
                if avail < want:
                    self._later(now + max(b.wait_for(want) for b in self.buckets))
                    return
                n = min(n, int(avail))
                for b in self.buckets:
                    b.tokens -= n
            if n == len(data):
                self.queue.popleft()
                dst.write(data)
            else:
                self.queue[0] = (release, data[n:])
                dst.write(data[:n])
            self.buffered -= n
            self.forwarded += n
            if self.src_paused and self.buffered <= self.max_buffer // 2 and self.src is not None:
                self.src_paused = False
                self.src.resume_reading()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Side(asyncio.Protocol):
    """The protocol of one socket; ``inbound`` carries what it receives, ``outbound`` feeds it."""

    def __init__(self, conn: _Connection, inbound: _Pipe, outbound: _Pipe) -> None:
        self.conn = conn
        self.inbound = inbound
        self.outbound = outbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.conn.closed:  # the other side went away while this one was connecting
            transport.abort()
            return
        # Selector transports read ``self.max_size`` bytes per recv (256 KiB by default).
        transport.max_size = _READ_SIZE  # type: ignore[attr-defined]
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.conn.transports.append(transport)
        self.inbound.src = transport
        self.outbound.dst = transport
        self.outbound.kick()

    def data_received(self, data: bytes) -> None:
        self.inbound.feed(data)

    def eof_received(self) -> bool:
        self.inbound.feed_eof()
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self.outbound.dst_paused = True

    def resume_writing(self) -> None:
        self.outbound.dst_paused = False
        self.outbound.kick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close(abort=exc is not None)


class _Connection:
    """A client connection, its upstream connection and the two pipes between them."""

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        now = proxy.loop.time()
        # The client's connect() returned at once on loopback; on a real network its first
        # bytes would leave one RTT later (SYN, SYN-ACK) and arrive half an RTT after that.
        handshake = now + proxy.rtt + proxy.delay if proxy.model_handshake else 0.0
        own = [_Bucket(proxy.rate, now)] if proxy.rate else []
        self.up = _Pipe(self, own + proxy.link_buckets[:1], handshake)
        own = [_Bucket(proxy.rate, now)] if proxy.rate else []
        self.down = _Pipe(self, own + proxy.link_buckets[1:], 0.0)
        self.transports: list[asyncio.Transport] = []
        self.connecting: asyncio.Task[None] | None = None
        self.closed = False
        self.finished_pipes = 0

    def client_protocol(self) -> _Side:
        return _Side(self, inbound=self.up, outbound=self.down)

    async def connect_upstream(self) -> None:
        try:
            await self.proxy.loop.create_connection(
                lambda: _Side(self, inbound=self.down, outbound=self.up),
                self.proxy.target_host, self.proxy.target_port)
        except OSError:
            self.close(abort=True)

    def pipe_finished(self) -> None:
        self.finished_pipes += 1
        if self.finished_pipes == 2:
            self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.connections.discard(self)
        self.proxy.bytes_up += self.up.forwarded
        self.proxy.bytes_down += self.down.forwarded
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        for pipe in (self.up, self.down):
            pipe.cancel()
        for t in self.transports:
            t.abort() if abort else t.close()


class DelayProxy:
    """Forward TCP connections from a loopback port to ``target`` with added latency and caps.

    ``rtt_ms`` is split evenly between the two directions. ``rate_bytes_per_s`` caps each
    connection (each direction separately); ``link_rate_bytes_per_s`` caps all connections
    together. The proxy runs its own event loop in a background thread, so synchronous and
    asynchronous clients alike can use it::

        with DelayProxy("127.0.0.1", nginx_port, rtt_ms=20, rate_bytes_per_s=100e6) as proxy:
            urllib3.request("GET", f"http://127.0.0.1:{proxy.port}/data/...")
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rtt_ms: float,
        rate_bytes_per_s: float | None = None,
        link_rate_bytes_per_s: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_buffer_bytes: int | None = None,
        model_handshake: bool = True,
    ) -> None:
        if rtt_ms < 0:
            raise ValueError("rtt_ms must not be negative")
        for rate in (rate_bytes_per_s, link_rate_bytes_per_s):
            if rate is not None and rate <= 0:
                raise ValueError("rates must be positive (or None for no cap)")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt = rtt_ms / 1000.0
        self.delay = self.rtt / 2
        self.rate = rate_bytes_per_s
        self.link_rate = link_rate_bytes_per_s
        self.listen_host = listen_host
        self.model_handshake = model_handshake
        self.max_buffer = max_buffer_bytes or _DEFAULT_BUFFER
        self._listen_port = listen_port
        self._port: int | None = None
        self.loop: asyncio.AbstractEventLoop  # created by start(), owned by the proxy's thread
        self.link_buckets: list[_Bucket] = []
        self.connections: set[_Connection] = set()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_accepted = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def from_profile(cls, profile: str | WanProfile | None, target_host: str, target_port: int,
                     **kwargs: Any) -> DelayProxy:
        """A proxy for one of :data:`WAN_PROFILES` (``None``/"loopback": no delay, no cap)."""
        p = WAN_PROFILES[profile] if isinstance(profile, str) else profile
        if p is None:
            return cls(target_host, target_port, rtt_ms=0.0, model_handshake=False, **kwargs)
        caps = ({"rate_bytes_per_s": p.rate_bytes_per_s} if p.per_connection
                else {"link_rate_bytes_per_s": p.rate_bytes_per_s})
        return cls(target_host, target_port, rtt_ms=p.rtt_ms, **caps, **kwargs)

    @property
    def port(self) -> int:
        """The local port clients connect to (known once started)."""
        if self._port is None:
            raise RuntimeError("DelayProxy is not started")
        return self._port

    def describe(self) -> str:
        """One line for benchmark reports: what this proxy emulates and how."""
        parts = [f"userspace delay-line proxy -> {self.target_host}:{self.target_port}",
                 f"rtt {self.rtt * 1000:g} ms"]
        if self.rate:
            parts.append(f"{self.rate / 1e6:g} MB/s per connection")
        if self.link_rate:
            parts.append(f"{self.link_rate / 1e6:g} MB/s shared link")
        if self.model_handshake and self.rtt:
            parts.append("handshake RTT on new connections")
        return ", ".join(parts)

    def stats(self) -> dict[str, int]:
        """Bytes forwarded each way and connections seen, for sanity checks in reports."""
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            async def collect() -> dict[str, int]:
                return self.stats()

            return asyncio.run_coroutine_threadsafe(collect(), self.loop).result(timeout=10)
        live = list(self.connections)
        return {
            "bytes_up": self.bytes_up + sum(c.up.forwarded for c in live),
            "bytes_down": self.bytes_down + sum(c.down.forwarded for c in live),
            "connections": self.connections_accepted,
            "open_connections": len(live),
        }

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> DelayProxy:
        """Start the event-loop thread and wait until the port listens."""
        if self._thread is not None:
            raise RuntimeError("DelayProxy already started")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="DelayProxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self._shutdown)
        thread.join()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            now = loop.time()
            if self.link_rate:
                self.link_buckets = [_Bucket(self.link_rate, now), _Bucket(self.link_rate, now)]
            self._server = loop.run_until_complete(loop.create_server(
                self._accept, self.listen_host, self._listen_port, backlog=1024))
            self._port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # report bind errors to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _accept(self) -> _Side:
        conn = _Connection(self)
        self.connections.add(conn)
        self.connections_accepted += 1
        conn.connecting = self.loop.create_task(conn.connect_upstream())
        return conn.client_protocol()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close(abort=True)
        self.loop.call_later(0.01, self.loop.stop)  # let the aborts reach the sockets


@functools.lru_cache(maxsize=1)
def tc_netem_available() -> bool:
    """Whether kernel netem could be used, tested without touching the host's interfaces.

    The probe adds a netem qdisc to ``lo`` inside a throw-away network namespace (``unshare
    --net``), which disappears with the command. It needs root, ``tc`` and ``unshare``; in any
    doubt the answer is False.
    """
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("unshare"):
        return False
    try:
        result = subprocess.run(
            ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"],
            capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def describe(profile: str | WanProfile | None = None) -> str:
    """Say which network emulation the benchmarks use here (and, given ``profile``, its values).

    ``describe("loopback")`` says that nothing is emulated; ``describe()`` describes the
    mechanism only.
    """
    netem = ("tc netem is available but not used" if tc_netem_available()
             else "tc netem is not available on this kernel")
    p = WAN_PROFILES[profile] if isinstance(profile, str) else profile
    if p is None and profile is not None:
        return f"loopback: no latency or rate emulation; {netem}"
    how = ("userspace asyncio delay-line TCP proxy (DelayProxy): latency, handshake RTT and "
           "token-bucket rate caps; no loss, jitter or congestion-window dynamics")
    if p is None:
        return f"{how}; {netem}"
    scope = "per connection" if p.per_connection else "shared link"
    rate = f", {p.rate_bytes_per_s / 1e6:g} MB/s {scope}" if p.rate_bytes_per_s else ""
    return f"rtt {p.rtt_ms:g} ms{rate} via {how}; {netem}"
