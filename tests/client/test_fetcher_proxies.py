"""The HTTP fetcher through forward proxies (real loopback servers, client/fetcher_servers.py):
absolute-form requests, proxy groups and resets, corrupting, stale, truncating, erroring and
stalled proxies."""

from __future__ import annotations

import time
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
    Server,
    start,
)
from cvmfs_ml.client.fetcher import DIRECT, Fetcher
from cvmfs_ml.errors import DownloadError
from waiting import ManualClock

pytestmark = pytest.mark.service


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
    origin: Server, servers: list[Server], closed_port: str, clock: ManualClock
) -> None:
    good = start(servers, Proxy)
    fetcher = Fetcher(
        [origin.repo_url],
        [[closed_port, "127.0.0.1:1"], [good.address]],
        max_retries=0,
        proxy_reset_after=100,
        **FAST,
    )
    assert all(p.startswith("http://") for p in fetcher.proxy_groups[0])  # scheme added
    rel, digest, content = OBJECTS[13]
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.failovers == 2  # both proxies of group 1, then group 2
    clock.now += 99
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert fetcher.stats.failovers == 2  # not yet reset: straight to group 2
    clock.now += 1
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
    rel, digest, content = OBJECTS[17]
    fetcher = Fetcher(
        [origin.repo_url], [[stalled.address], [DIRECT]], max_retries=0,
        **{**FAST, "timeout": 0.3},
    )  # fmt: skip
    started = time.monotonic()
    assert fetcher.fetch(rel, digest, compressed=True) == content
    assert time.monotonic() - started < 30  # the stall lasts 60 s: the timeout ended the try
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
