"""The HTTP fetcher against real local servers: the reference repository, faulty hosts, proxies.

Every server here is a real ``ThreadingHTTPServer`` on loopback: an origin serving the reference
repository written by upstream ``cvmfs_server``, hosts that answer 404/500/429/302, and forward
proxies that relay, corrupt, truncate, refuse or stall.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import resource
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.fetcher_servers import (
    BIGGEST,
    FAST,
    FQRN,
    OBJECTS,
    REPO_DIR,
    Fixed,
    Origin,
    Proxy,
    Redirect,
    Server,
    hits,
    start,
)
from cvmfs_ml import __version__
from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.config import load_config
from cvmfs_ml.client.fetcher import DIRECT, Fetcher, FetchStats
from cvmfs_ml.cvmfs.hashing import Digest, hash_bytes
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path, parse_object_path
from cvmfs_ml.errors import DownloadError
from waiting import ManualClock

pytestmark = pytest.mark.service


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


def test_host_reset_after_returns_to_the_first_host(
    origin: Server, servers: list[Server], clock: ManualClock
) -> None:
    broken = start(servers, Fixed, status=503)
    fetcher = Fetcher([broken.repo_url, origin.repo_url], host_reset_after=100, **FAST)
    rel, digest, content = OBJECTS[5]
    assert fetcher.fetch(rel, digest, compressed=True) == content
    clock.now += 99
    assert fetcher.current_host == origin.repo_url
    clock.now += 1
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
