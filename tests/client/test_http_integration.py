"""The client end to end over HTTP: real nginx as the Stratum 0, real Squid in between.

A repository published by our publisher (nested catalog, chunked files) is served by nginx with
the configuration of docs/nginx.conf; clients read it directly, through Squid, through a
fault-injecting proxy written here (it corrupts or truncates bodies), and across dead hosts.
nginx's access log is the witness of what reached the origin.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmfs_ml.client.cache import ObjectCache
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import DownloadError
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.testing import Nginx, Squid
from quiet_http import QuietHTTPServer
from repos import SMALL_CHUNKS
from waiting import wait_until

pytestmark = pytest.mark.service

FQRN = "http.test"
FAST = {"backoff_init": 0.01, "backoff_max": 0.02, "timeout": 5.0, "timeout_direct": 5.0}
SETTINGS = SMALL_CHUNKS
FILES = {
    "/a.txt": b"hello over http\n",
    "/model/weights.bin": os.urandom(3 * 2**20),  # ~24 chunks, in the nested catalog
    "/model/config.json": b'{"layers": 4}\n',
    "/data/blob.bin": os.urandom(600 * 1024),
}


# ---------------------------------------------------------------- the repository


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served root (``cvmfs/<fqrn>``, ``keys/``), published once per module."""
    root = tmp_path_factory.mktemp("s0")
    publisher = create_repository(root / "cvmfs", FQRN, settings=SETTINGS)
    source = tmp_path_factory.mktemp("src")
    for path, data in FILES.items():
        (source / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (source / path.lstrip("/")).write_bytes(data)
    with publisher.transaction() as txn:
        txn.add_folder(source / "model", "/model", nested_catalog=True)
        txn.add_folder(source / "data", "/data")
        txn.add_bytes("/a.txt", FILES["/a.txt"])
        txn.commit(tag="v1")
    return root


@pytest.fixture
def served(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template, for tests that change what the server holds."""
    shutil.copytree(template, tmp_path / "s0", symlinks=True)
    return tmp_path / "s0"


def key_of(root: Path) -> Path:
    return root / "keys" / f"{FQRN}.pub"


def data_paths(nginx: Nginx, expect: int = 0) -> list[str]:
    """The data objects in nginx's access log, once it holds ``expect`` lines (each is written
    after its answer went out, so a client that is done can be ahead of the log)."""
    return [r.path for r in nginx.requests(expect=expect) if "/data/" in r.path]


def upstream(records: list) -> int:
    """How many of Squid's records cost a request to the origin (one nginx line each)."""
    return sum(r.contacted_upstream for r in records)


def read_all(repo: Repository) -> None:
    for path, data in FILES.items():
        assert repo.read_bytes(path) == data, path


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- a faulty proxy


class FaultProxy:
    """A forward proxy on loopback that relays to the origin and damages bodies.

    ``mode``: ``corrupt`` flips one byte in the middle of every ``/data/`` body (same length,
    so only the hash can tell); ``truncate`` announces the full length and sends half of any
    body. Requests are recorded with their ``Cache-Control`` header.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[tuple[str, str | None]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.requests.append((self.path, self.headers.get("Cache-Control")))
                target = urllib.parse.urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
                upstream.request("GET", target.path)
                answer = upstream.getresponse()
                status, body = answer.status, answer.read()
                upstream.close()
                send = body
                if status == 200 and proxy.mode == "corrupt" and "/data/" in target.path:
                    middle = len(body) // 2
                    send = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                if status == 200 and proxy.mode == "truncate":
                    send = body[: len(body) // 2]
                    self.close_connection = True
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(send)

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    started: list[FaultProxy] = []

    def start(mode: str) -> FaultProxy:
        started.append(FaultProxy(mode))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


# ---------------------------------------------------------------- Squid and the origin


def test_reads_through_squid_and_a_second_client_costs_the_origin_nothing(
    template: Path,
    nginx_factory: Callable[..., Nginx],
    squid_factory: Callable[..., Squid],
    tmp_path: Path,
) -> None:
    nginx = nginx_factory(template)
    squid = squid_factory()
    url = nginx.repo_url(FQRN)
    with Repository.open(
        url, public_key=key_of(template), proxy=squid.url, cache=tmp_path / "c1", **FAST
    ) as first:
        read_all(first)
        assert first.source.stats.failovers == 0
        asked = first.source.stats.requests
    after_first = data_paths(nginx, upstream(squid.requests(expect=asked)))
    assert len(after_first) == len(set(after_first)) > 20  # every object once
    with Repository.open(
        url, public_key=key_of(template), proxy=squid.url, cache=tmp_path / "c2", **FAST
    ) as second:
        read_all(second)
        asked += second.source.stats.requests
    through = squid.requests(expect=asked)
    # the second client was served by Squid alone
    assert data_paths(nginx, upstream(through)) == after_first
    served_by_squid = [r for r in through if "/data/" in r.url]
    assert len(served_by_squid) == 2 * len(after_first)
    assert all(r.url.startswith(url) for r in served_by_squid)  # absolute-form requests


def test_first_host_down_the_second_is_used(
    template: Path, nginx_factory: Callable[..., Nginx], closed_port: int, tmp_path: Path
) -> None:
    nginx = nginx_factory(template)
    servers = f"http://127.0.0.1:{closed_port}/cvmfs/@fqrn@;{nginx.url}/cvmfs/@fqrn@"
    with Repository.open(servers, FQRN, key_of(template), cache=tmp_path / "c", **FAST) as repo:
        read_all(repo)
        assert repo.source.current_host == nginx.repo_url(FQRN)
        assert repo.source.stats.failovers == 1  # switched once, then stayed
    wait_until(lambda: any(r.path.endswith("/.cvmfspublished") for r in nginx.requests()), 60,
               "the manifest request in nginx's log")  # fmt: skip


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_damaging_proxy_is_detected_and_the_next_proxy_used(
    mode: str,
    template: Path,
    nginx_factory: Callable[..., Nginx],
    squid_factory: Callable[..., Squid],
    fault_proxy: Callable[[str], FaultProxy],
    tmp_path: Path,
) -> None:
    nginx = nginx_factory(template)
    squid = squid_factory()
    bad = fault_proxy(mode)
    with Repository.open(
        nginx.repo_url(FQRN),
        public_key=key_of(template),
        proxy=f"{bad.url};{squid.url}",
        cache=tmp_path / "c",
        **FAST,
    ) as repo:
        read_all(repo)
        stats = repo.source.stats
        assert stats.bad_data == 2 and stats.failovers == 1
        assert repo.source.proxy_groups == [[bad.url], [squid.url]]
    # the damaged path was retried once with no-cache, then skipped for good
    assert [cache for _, cache in bad.requests][-2:] == [None, "no-cache"]
    assert len(squid.requests(expect=21)) > 20


def test_all_hosts_down_names_what_was_tried(tmp_path: Path, closed_port: int) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        second = other.getsockname()[1]
    servers = f"http://127.0.0.1:{closed_port}/cvmfs/@fqrn@;http://127.0.0.1:{second}/cvmfs/@fqrn@"
    with pytest.raises(DownloadError) as caught:
        Repository.open(servers, FQRN, [], cache=tmp_path / "c", max_retries=0, **FAST)
    message = str(caught.value)
    assert message.startswith("could not fetch .cvmfspublished (tried ")
    for port in (closed_port, second):
        assert f"http://127.0.0.1:{port}/cvmfs/{FQRN}/.cvmfspublished via DIRECT" in message
    assert "connection refused" in message


def test_tampered_object_on_the_server_is_refused_and_never_cached(
    served: Path, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    nginx = nginx_factory(served)
    with Repository.open(
        nginx.repo_url(FQRN), public_key=key_of(served), cache=tmp_path / "c", **FAST
    ) as repo:
        digest = repo.stat("/a.txt").digest
        assert digest is not None
        rel = object_path(digest, ObjectKind.FILE)
        path = served / "cvmfs" / FQRN / rel
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(
            DownloadError, match=f"could not fetch {rel} .*(hash mismatch|corrupt zlib)"
        ):
            repo.read_bytes("/a.txt")
        assert repo.cache.get_path(digest) is None
        assert repo.read_bytes("/data/blob.bin") == FILES["/data/blob.bin"]


# ---------------------------------------------------------------- new revisions via Squid


def test_stale_manifest_in_squid_is_bypassed_and_refresh_sees_new_revisions(
    served: Path,
    nginx_factory: Callable[..., Nginx],
    squid_factory: Callable[..., Squid],
    tmp_path: Path,
) -> None:
    nginx = nginx_factory(served)
    squid = squid_factory()
    url, key = nginx.repo_url(FQRN), key_of(served)
    publisher = Publisher.open(served / "cvmfs" / FQRN)
    via_squid = Repository.open(url, public_key=key, proxy=squid.url, cache=tmp_path / "a", **FAST)
    assert via_squid.revision == 1  # Squid now holds manifest revision 1 (max-age 61 s)
    with publisher.transaction() as txn:
        txn.add_bytes("/a.txt", b"revision two\n")
        txn.commit()
    # TTL-style refresh leaves proxy caches alone: Squid still answers with revision 1.
    assert via_squid.refresh(nocache=False) is False
    # An explicit refresh asks for a fresh manifest and switches.
    assert via_squid.refresh() is True
    assert via_squid.read_bytes("/a.txt") == b"revision two\n"
    via_squid.close()
    asked = via_squid.source.stats.requests  # through Squid so far

    # Rollback check + no-cache retry: a client whose breadcrumb says revision 3 gets a stale
    # revision 2 from Squid first, and must then fetch past the cache instead of failing.
    with publisher.transaction() as txn:
        txn.add_bytes("/a.txt", b"revision three\n")
        txn.commit()
    with Repository.open(url, public_key=key, cache=tmp_path / "b", **FAST) as direct:
        assert direct.revision == 3
        direct_asked = direct.source.stats.requests
    # logs are written after the answers: wait for a line per request that reached nginx
    to_origin = direct_asked + upstream(squid.requests(expect=asked))
    before = len([r for r in nginx.requests(expect=to_origin)
                  if r.path.endswith("/.cvmfspublished")])  # fmt: skip
    with Repository.open(
        url, public_key=key, proxy=squid.url, cache=tmp_path / "b", **FAST
    ) as through_squid:
        assert through_squid.revision == 3
        assert through_squid.read_bytes("/a.txt") == b"revision three\n"
        asked += through_squid.source.stats.requests
    records = squid.requests(expect=asked)
    manifests = [r for r in records if r.url.endswith("/.cvmfspublished")]
    assert not manifests[-2].contacted_upstream  # the stale copy, from Squid's cache
    assert manifests[-1].contacted_upstream  # the no-cache retry went to nginx
    to_origin = direct_asked + upstream(records)
    after = len([r for r in nginx.requests(expect=to_origin)
                 if r.path.endswith("/.cvmfspublished")])  # fmt: skip
    assert after == before + 1


# ---------------------------------------------------------------- the cache


def test_cache_quota_is_honoured_under_eviction(
    template: Path, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    nginx = nginx_factory(template)
    quota = 1 * 2**20
    cache = ObjectCache(tmp_path / "c", quota)
    with Repository.open(nginx.repo_url(FQRN), public_key=key_of(template), cache=cache) as repo:
        for _ in range(2):
            for path, data in FILES.items():
                assert repo.read_bytes(path) == data
                assert cache.usage().size_bytes <= quota
        pieces = repo.layout("/model/weights.bin").pieces
        assert sum(cache.contains(p.digest) for p in pieces) < len(pieces)  # evicted some
        assert cache.contains(repo.root_hash)  # the pinned root catalog stayed
    cache.close()


_READER = """
import hashlib, sys
from cvmfs_ml.client.repository import Repository
url, key, cache, path = sys.argv[1:5]
with Repository.open(url, public_key=key, cache=cache) as repo:
    data = repo.read_bytes(path)
print(hashlib.sha256(data).hexdigest(), len(data))
"""


def test_two_processes_reading_the_same_file_share_the_cache(
    template: Path, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    nginx = nginx_factory(template)
    args = [nginx.repo_url(FQRN), str(key_of(template)), str(tmp_path / "shared")]
    path = "/model/weights.bin"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", _READER, *args, path], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [reader.communicate(timeout=120)[0].split() for reader in readers]
    assert all(reader.returncode == 0 for reader in readers)
    expected = [hashlib.sha256(FILES[path]).hexdigest(), str(len(FILES[path]))]
    assert outputs == [expected, expected]
    with Repository.open(nginx.repo_url(FQRN), public_key=key_of(template), cache=args[2]) as repo:
        pieces = repo.layout(path).pieces
        assert all(repo.cache.verify(p.digest) for p in pieces)  # complete, uncorrupted
        assert repo.read_bytes(path) == FILES[path]


def test_cache_file_corrupted_on_disk_is_detected_and_refetched(
    template: Path, nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    nginx = nginx_factory(template)
    url, key = nginx.repo_url(FQRN), key_of(template)
    with Repository.open(url, public_key=key, cache=tmp_path / "c") as repo:
        read_all(repo)
        piece = repo.layout("/model/weights.bin").pieces[3].digest
        cached = repo.cache.path_of(piece)
        asked = repo.source.stats.requests  # all to nginx: one log line each
    damaged = bytearray(cached.read_bytes())
    damaged[100] ^= 0x55
    cached.write_bytes(bytes(damaged))
    rel = f"/cvmfs/{FQRN}/{object_path(piece, ObjectKind.PARTIAL)}"
    assert data_paths(nginx, asked).count(rel) == 1
    with Repository.open(url, public_key=key, cache=tmp_path / "c") as repo:
        read_all(repo)
        assert repo.cache.usage().quarantined == 1
        asked += repo.source.stats.requests
    paths = data_paths(nginx, asked)
    assert paths.count(rel) == 2  # refetched from the origin, nothing else
    assert len(paths) == len(set(paths)) + 1
