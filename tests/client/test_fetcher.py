"""The HTTP fetcher against real local servers: the reference repository, faulty hosts, proxies.

Every server here is a real ``ThreadingHTTPServer`` on loopback: an origin serving the reference
repository written by upstream ``cvmfs_server``, hosts that answer 404/500/429/302, and forward
proxies that relay, corrupt, truncate, refuse or stall.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import http.server
import io
import os
import resource
import socket
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cvmfs_ml import __version__
from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import load_config
from cvmfs_ml.client.fetcher import DIRECT, Fetcher, FetchStats
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path, parse_object_path
from cvmfs_ml.errors import DownloadError

pytestmark = pytest.mark.service

FIXTURE = Path("/work/shared/fixtures/cvmfs-reference-repo")
REPO_DIR = FIXTURE / "cvmfs" / "ref.test.local"
FQRN = "ref.test.local"
FAST = {"backoff_init": 0.01, "backoff_max": 0.02, "timeout": 2.0, "timeout_direct": 2.0}


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
        cls = type("Handler", (handler,), {"state": self, **attrs})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        self.httpd.daemon_threads = True
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
        if self.mode == "hang":
            time.sleep(1.0)
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


@pytest.fixture(scope="module")
def origin() -> Iterator[Server]:
    server = Server(Origin)
    yield server
    server.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Per-test servers, closed at the end: append to the list."""
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def start(servers: list[Server], handler: type[Recording], **attrs: object) -> Server:
    server = Server(handler, **attrs)
    servers.append(server)
    return server


@pytest.fixture
def closed_port() -> str:
    """An address nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def hits(server: Server, rel: str) -> list[dict[str, str]]:
    return [headers for path, headers in server.requests if path.endswith(rel)]


# ---------------------------------------------------------------- plain fetching


def test_every_reference_object_fetches_verified_and_inflated(origin: Server) -> None:
    with Fetcher([origin.repo_url], **FAST) as fetcher:
        for rel, digest, content in OBJECTS:
            assert fetcher.fetch(rel, digest, compressed=True) == content
        stats = fetcher.stats
    assert stats.fetches == stats.requests == len(OBJECTS)
    assert stats.bytes_received == sum((REPO_DIR / rel).stat().st_size for rel, _, _ in OBJECTS)
    assert stats.failovers == stats.retries == stats.bad_data == 0


def test_manifest_is_fetched_raw_without_a_hash(origin: Server) -> None:
    with Fetcher([origin.repo_url]) as fetcher:
        raw = fetcher.fetch(".cvmfspublished", None, compressed=False)
    assert raw == (REPO_DIR / ".cvmfspublished").read_bytes()
    assert raw.startswith(b"Cf423a05b8928434eebf9698fb5b8a15211eb724a\n")


def test_headers_and_keep_alive(servers: list[Server]) -> None:
    origin = start(servers, Origin)
    with Fetcher([origin.repo_url], pool_size=4) as fetcher:
        for rel, digest, _ in OBJECTS[:20]:
            fetcher.fetch(rel, digest, compressed=True, nocache=rel == OBJECTS[0][0])
    first, *rest = (headers for _, headers in origin.requests)
    for headers in [first, *rest]:
        assert headers["User-Agent"] == f"cvmfs-ml {__version__}"
        assert headers["Connection"] == "Keep-Alive"
    assert first["Cache-Control"] == "no-cache" and first["Pragma"] == "no-cache"
    assert all("Cache-Control" not in h for h in rest)
    assert origin.connections == 1  # 20 requests over one kept-alive connection


def test_fetch_into_streams_into_a_file(origin: Server, tmp_path: Path) -> None:
    rel, digest, content = BIGGEST
    with Fetcher([origin.repo_url]) as fetcher, open(tmp_path / "out", "w+b") as out:
        written = fetcher.fetch_into(rel, digest, True, out)
        assert fetcher.fetch(rel, digest, compressed=True, sink=out) == b""
    assert written == len(content) > 2 * 2**20 - 1
    assert (tmp_path / "out").read_bytes() == content + content


def test_uncompressed_fetch_checks_the_raw_bytes(origin: Server) -> None:
    rel, digest, _ = OBJECTS[0]
    stored = (REPO_DIR / rel).read_bytes()
    with Fetcher([origin.repo_url]) as fetcher:
        assert fetcher.fetch(rel, digest, compressed=False) == stored


def test_into_the_cache_with_put_stream(origin: Server, tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "cache")
    with Fetcher([origin.repo_url]) as fetcher:
        for rel, digest, content in OBJECTS[:10]:
            kind = parse_object_path(rel)[1]
            with cache.put_stream(digest) as txn:
                fetcher.fetch_into(object_path(digest, kind), digest, True, txn)
            path = cache.get_path(digest)
            assert path is not None and path.read_bytes() == content
            assert path == cache.root / digest.hex[:2] / digest.hex[2:]


def test_from_config_with_a_dead_proxy_then_direct(
    origin: Server, closed_port: str, tmp_path: Path
) -> None:
    env = {
        "HOME": str(tmp_path),
        "CVMFS_SERVER_URL": f"{origin.address}/cvmfs/@fqrn@",
        "CVMFS_HTTP_PROXY": f"{closed_port.removeprefix('http://')};DIRECT",
        "CVMFS_MAX_RETRIES": "0",
        "CVMFS_ML_PARALLEL": "3",
    }
    fetcher = Fetcher.from_config(load_config(FQRN, env=env), backoff_init=0.0)
    assert fetcher.hosts == [origin.repo_url]
    assert fetcher.proxy_groups == [[closed_port], [DIRECT]]
    rel, digest, content = OBJECTS[2]
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.failovers == 1 and fetcher.stats.retries == 0


def test_bad_relative_paths_are_refused(origin: Server) -> None:
    with Fetcher([origin.repo_url]) as fetcher:
        for rel in ("../etc/passwd", "data/../../x", "http://evil/x", ""):
            with pytest.raises(ValueError):
                fetcher.fetch(rel, None, compressed=False)
    assert not any("passwd" in path for path, _ in origin.requests)


# ---------------------------------------------------------------- host failover


def test_host_failover_404_then_500_then_good(origin: Server, servers: list[Server]) -> None:
    missing = start(servers, Fixed, status=404)
    broken = start(servers, Fixed, status=500)
    rel, digest, content = OBJECTS[3]
    fetcher = Fetcher([missing.repo_url, broken.repo_url, origin.repo_url], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert len(missing.requests) == len(broken.requests) == 1  # host errors are not retried
    assert fetcher.stats.failovers == 2
    assert fetcher.current_host == origin.repo_url
    # the next fetch starts where the last one succeeded (shared failover state)
    rel2, digest2, content2 = OBJECTS[4]
    assert fetcher.fetch(rel2, digest2, compressed=True) == content2
    assert len(missing.requests) == len(broken.requests) == 1


def test_host_reset_after_returns_to_the_first_host(origin: Server, servers: list[Server]) -> None:
    broken = start(servers, Fixed, status=503)
    fetcher = Fetcher([broken.repo_url, origin.repo_url], host_reset_after=0.2, **FAST)
    rel, digest, content = OBJECTS[5]
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.current_host == origin.repo_url
    time.sleep(0.25)
    assert fetcher.current_host == broken.repo_url
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert len(broken.requests) == 2


def test_throttled_host_is_retried_with_backoff_then_skipped(
    origin: Server, servers: list[Server]
) -> None:
    throttled = start(servers, Fixed, status=429)
    rel, digest, content = OBJECTS[6]
    fetcher = Fetcher([throttled.repo_url, origin.repo_url], max_retries=1, **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert len(throttled.requests) == 2  # one backoff retry on the same path
    assert fetcher.stats.retries == 1


def test_refused_direct_connection_fails_over_to_next_host(
    origin: Server, closed_port: str
) -> None:
    rel, digest, content = OBJECTS[7]
    fetcher = Fetcher([f"{closed_port}/cvmfs/{FQRN}", origin.repo_url], max_retries=0, **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.current_host == origin.repo_url


def test_redirects_only_with_follow_redirects(origin: Server, servers: list[Server]) -> None:
    mover = start(servers, Redirect, target=origin.address)
    rel, digest, content = OBJECTS[8]
    with pytest.raises(DownloadError, match="redirect"):
        Fetcher([mover.repo_url], **FAST).fetch(rel, digest, compressed=True)
    following = Fetcher([mover.repo_url], follow_redirects=True, **FAST)
    assert following.fetch(rel, digest, compressed=True) == content


def test_corrupt_host_is_refetched_without_cache_then_skipped(
    origin: Server, servers: list[Server]
) -> None:
    """A wrong body over DIRECT: one no-cache retry, then a host failure."""
    rel, digest, _ = OBJECTS[9]
    wrong = hash_bytes(b"not this object")
    fetcher = Fetcher([origin.repo_url], **FAST)
    before = len(hits(origin, rel))
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(rel, wrong, compressed=True)
    assert [reason for _, _, reason in caught.value.attempts] == [
        f"hash mismatch: got {digest.hex}",
        f"hash mismatch: got {digest.hex} (no-cache)",
    ]
    requests = hits(origin, rel)[before:]
    assert len(requests) == 2 and requests[1]["Cache-Control"] == "no-cache"
    assert fetcher.stats.bad_data == 2


# ---------------------------------------------------------------- proxies


def test_requests_go_through_the_proxy_in_absolute_form(
    origin: Server, servers: list[Server]
) -> None:
    proxy = start(servers, Proxy)
    rel, digest, content = OBJECTS[10]
    fetcher = Fetcher([origin.repo_url], [[proxy.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert proxy.requests[0][0] == f"{origin.repo_url}/{rel}"


def test_refused_proxy_fails_over_to_next_group(
    origin: Server, servers: list[Server], closed_port: str
) -> None:
    proxy = start(servers, Proxy)
    rel, digest, content = OBJECTS[11]
    fetcher = Fetcher([origin.repo_url], [[closed_port], [proxy.address]], max_retries=1, **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.retries == 1  # the refused proxy got one backoff retry
    assert fetcher.stats.failovers == 1
    # the next fetch goes straight to the working group
    fetcher.fetch(OBJECTS[12][0], OBJECTS[12][1], compressed=True)
    assert fetcher.stats.retries == 1 and len(proxy.requests) == 2


def test_proxy_within_a_group_then_reset_to_first_group(
    origin: Server, servers: list[Server], closed_port: str
) -> None:
    good = start(servers, Proxy)
    fetcher = Fetcher(
        [origin.repo_url],
        [[closed_port, "127.0.0.1:1"], [good.address]],
        max_retries=0,
        proxy_reset_after=0.2,
        **FAST,
    )
    assert all(p.startswith("http://") for p in fetcher.proxy_groups[0])  # scheme added
    rel, digest, content = OBJECTS[13]
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.failovers == 2  # both proxies of group 1, then group 2
    time.sleep(0.25)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.failovers == 4  # after the reset, group 1 was tried again


def test_corrupting_proxy_gets_a_no_cache_retry_then_is_skipped(
    origin: Server, servers: list[Server]
) -> None:
    bad = start(servers, Proxy, mode="corrupt")
    good = start(servers, Proxy)
    rel, digest, content = BIGGEST
    fetcher = Fetcher([origin.repo_url], [[bad.address], [good.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    seen = [headers for _, headers in bad.requests]
    assert len(seen) == 2
    assert "Cache-Control" not in seen[0]
    assert seen[1]["Cache-Control"] == "no-cache" and seen[1]["Pragma"] == "no-cache"
    assert len(good.requests) == 1
    assert fetcher.current_host == origin.repo_url  # the proxy was blamed, not the host
    assert fetcher.proxy_groups == [[bad.address], [good.address]]
    stats = fetcher.stats
    assert (stats.bad_data, stats.retries, stats.failovers) == (2, 1, 1)


def test_corruption_of_raw_objects_is_caught_by_the_hash(
    origin: Server, servers: list[Server]
) -> None:
    """Uncompressed objects (catalog flag 0x800) have no zlib check: the hash must catch it."""
    bad = start(servers, Proxy, mode="corrupt")
    good = start(servers, Proxy)
    rel, digest, _ = BIGGEST
    stored = (REPO_DIR / rel).read_bytes()
    fetcher = Fetcher([origin.repo_url], [[bad.address], [good.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=False) == stored
    assert len(bad.requests) == 2 and len(good.requests) == 1
    assert fetcher.stats.bad_data == 2


def test_stale_proxy_cache_is_fixed_by_the_no_cache_retry(
    origin: Server, servers: list[Server], tmp_path: Path
) -> None:
    stale = start(servers, Proxy, mode="stale")
    rel, digest, content = BIGGEST
    fetcher = Fetcher([origin.repo_url], [[stale.address]], **FAST)
    with open(tmp_path / "out", "w+b") as out:
        assert fetcher.fetch_into(rel, digest, True, out) == len(content)
    # the first (corrupt) try was rewound: the file holds exactly the good content
    assert (tmp_path / "out").read_bytes() == content
    assert len(stale.requests) == 2 and fetcher.stats.failovers == 0


def test_truncating_proxy_is_detected(origin: Server, servers: list[Server]) -> None:
    short = start(servers, Proxy, mode="truncate")
    good = start(servers, Proxy)
    rel, digest, content = BIGGEST
    fetcher = Fetcher([origin.repo_url], [[short.address], [good.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert len(short.requests) == 2 and len(good.requests) == 1
    assert fetcher.stats.bad_data == 2


def test_squid_error_is_a_proxy_failure_not_a_host_failure(
    origin: Server, servers: list[Server]
) -> None:
    squid = start(servers, Proxy, mode="squid-error")
    good = start(servers, Proxy)
    rel, digest, content = OBJECTS[14]
    fetcher = Fetcher(
        [origin.repo_url, "http://127.0.0.2:9/cvmfs/x"], [[squid.address], [good.address]], **FAST
    )
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.current_host == origin.repo_url
    assert len(squid.requests) == 1 and len(good.requests) == 1


def test_host_5xx_through_a_proxy_blames_the_host(origin: Server, servers: list[Server]) -> None:
    broken = start(servers, Fixed, status=502)
    proxy = start(servers, Proxy)
    rel, digest, content = OBJECTS[15]
    fetcher = Fetcher([broken.repo_url, origin.repo_url], [[proxy.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.current_host == origin.repo_url
    assert fetcher.stats.failovers == 1 and len(proxy.requests) == 2


def test_other_status_through_a_proxy_blames_the_proxy(
    origin: Server, servers: list[Server]
) -> None:
    denying = start(servers, Proxy, mode="forbidden")
    good = start(servers, Proxy)
    rel, digest, content = OBJECTS[16]
    fetcher = Fetcher([origin.repo_url], [[denying.address], [good.address]], **FAST)
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert len(denying.requests) == 1  # proxy HTTP errors are not retried


def test_stalled_proxy_times_out(origin: Server, servers: list[Server]) -> None:
    stalled = start(servers, Proxy, mode="hang")
    good = start(servers, Proxy)
    rel, digest, content = OBJECTS[17]
    fetcher = Fetcher(
        [origin.repo_url], [[stalled.address], [good.address]], max_retries=0,
        **{**FAST, "timeout": 0.3},
    )  # fmt: skip
    started = time.monotonic()
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert time.monotonic() - started < 1.0
    assert fetcher.stats.failovers == 1


# ---------------------------------------------------------------- total failure


def test_everything_down_names_every_attempt(servers: list[Server], closed_port: str) -> None:
    missing = start(servers, Fixed, status=404)
    dead_host = f"{closed_port}/cvmfs/{FQRN}"
    rel, digest, _ = OBJECTS[18]
    fetcher = Fetcher([dead_host, missing.repo_url], max_retries=1, **FAST)
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(rel, digest, compressed=True)
    error = caught.value
    assert error.what == rel
    assert [(url, proxy) for url, proxy, _ in error.attempts] == [
        (f"{dead_host}/{rel}", DIRECT),
        (f"{dead_host}/{rel}", DIRECT),
        (f"{missing.repo_url}/{rel}", DIRECT),
    ]
    assert "connection refused" in error.attempts[0][2]
    assert error.attempts[2][2] == "HTTP 404"
    assert dead_host in str(error) and missing.repo_url in str(error)


def test_all_proxies_down_for_every_host(
    origin: Server, servers: list[Server], closed_port: str
) -> None:
    second = start(servers, Origin)
    proxies = [[closed_port], ["http://127.0.0.1:1"]]
    fetcher = Fetcher([origin.repo_url, second.repo_url], proxies, max_retries=0, **FAST)
    rel, digest, _ = OBJECTS[19]
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(rel, digest, compressed=True)
    tried = {(url.split("/cvmfs/")[0], proxy) for url, proxy, _ in caught.value.attempts}
    assert tried == {
        (origin.address, closed_port),
        (origin.address, "http://127.0.0.1:1"),
        (second.address, closed_port),
        (second.address, "http://127.0.0.1:1"),
    }
    assert not second.requests  # never reached without a working proxy


# ---------------------------------------------------------------- concurrency


def test_many_threads_fetch_every_object_correctly(origin: Server, servers: list[Server]) -> None:
    proxy = start(servers, Proxy)
    fetcher = Fetcher([origin.repo_url], [[proxy.address], [DIRECT]], pool_size=16, **FAST)
    work = OBJECTS * 3
    before = fetcher.stats

    def one(item: tuple[str, Digest, bytes]) -> bool:
        rel, digest, content = item
        if len(content) > 2**20:
            out = io.BytesIO()
            fetcher.fetch_into(rel, digest, True, out)
            return out.getvalue() == content
        return fetcher.fetch(rel, digest, compressed=True) == content

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, work))
    assert all(results)
    delta: FetchStats = fetcher.stats - before
    assert delta.fetches == delta.requests == len(work)
    assert delta.failovers == delta.bad_data == 0
    assert len(proxy.requests) == len(work)
    assert proxy.connections <= 16  # kept alive, pooled


def test_concurrent_failover_keeps_every_fetch_correct(
    origin: Server, servers: list[Server], closed_port: str
) -> None:
    bad = start(servers, Proxy, mode="corrupt")
    good = start(servers, Proxy)
    fetcher = Fetcher(
        [f"{closed_port}/cvmfs/{FQRN}", origin.repo_url],
        [[bad.address], [good.address]],
        max_retries=0,
        **FAST,
    )
    small = [o for o in OBJECTS if len(o[2]) < 2**20]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda o: fetcher.fetch(o[0], o[1], compressed=True), small))
    assert results == [content for _, _, content in small]
    assert fetcher.current_host == origin.repo_url
    assert fetcher.proxy_groups[0] == [bad.address]


def test_object_path_round_trip_for_fixture() -> None:
    """Guards the helper the tests rely on: names are the SHA-1 of the stored bytes."""
    for rel, digest, _ in OBJECTS:
        assert hash_bytes((REPO_DIR / rel).read_bytes()) == digest
        kind = parse_object_path(rel)[1]
        assert object_path(digest, kind) == rel
    assert {parse_object_path(rel)[1] for rel, _, _ in OBJECTS} >= {
        ObjectKind.CATALOG,
        ObjectKind.PARTIAL,
        ObjectKind.FILE,
    }


# ---------------------------------------------------------------- the client's own limits


@contextlib.contextmanager
def no_descriptors_left() -> Iterator[None]:
    """Every file descriptor this process may open is taken (EMFILE on the next one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    taken: list[int] = []
    try:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_descriptors_is_not_a_server_failure(
    origin: Server, servers: list[Server]
) -> None:
    """No socket for want of descriptors is this process's shortage: before, it was retried and
    then blamed on the server (and each proxy), which left a healthy host out of rotation for
    CVMFS_HOST_RESET_AFTER. It is an ``OSError`` EMFILE now, for the caller to free some."""
    second = start(servers, Origin)
    fetcher = Fetcher([origin.repo_url, second.repo_url], proxy_groups=[["127.0.0.1:9", DIRECT]],
                      **FAST)  # fmt: skip
    rel, digest, content = OBJECTS[2]
    with no_descriptors_left(), pytest.raises(OSError) as caught:
        fetcher.fetch(rel, digest, compressed=True)
    assert caught.value.errno == errno.EMFILE and not isinstance(caught.value, DownloadError)
    assert rel in str(caught.value)
    assert fetcher.current_host == origin.repo_url
    assert fetcher.stats.failovers == 0 and fetcher.stats.retries == 0
    assert fetcher.fetch(rel, digest, compressed=True) == content  # once descriptors are free
    assert not second.requests
