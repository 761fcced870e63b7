"""The real services the integration tests rely on, and the example configs in docs/.

nginx must serve a repository with upstream's header policy, Squid must cache what nginx
serves (one origin request for many client requests), docker-registry must answer the
registry API, and docs/nginx.conf and docs/squid.conf must say what the fixtures run.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from cvmfs_ml.testing import (
    CVMFS_SQUID_POLICY,
    AccessRecord,
    DockerRegistry,
    Nginx,
    ServiceError,
    Squid,
    SquidRecord,
    nginx_main_config,
    nginx_site_config,
    parse_nginx_access_log,
    parse_squid_access_log,
)

FQRN = "ref.test.local"
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def data_object(reference_served: Path) -> Path:
    """The largest object of the reference repository (a 2 MiB chunk)."""
    objects = [p for p in (reference_served / "data").rglob("*") if p.is_file()]
    return max(objects, key=lambda p: p.stat().st_size)


def _object_url(nginx: Nginx, reference_served: Path, obj: Path) -> str:
    return f"{nginx.repo_url(FQRN)}/{obj.relative_to(reference_served).as_posix()}"


def _origin_requests(nginx: Nginx, path: str, expect: int = 0) -> list[AccessRecord]:
    return [r for r in nginx.requests(expect=expect) if r.path == path]


def _squid_requests(squid: Squid, url: str, expect: int) -> list[SquidRecord]:
    return [r for r in squid.requests(expect=expect) if r.url == url]


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------


@pytest.mark.service
def test_nginx_serves_the_repository_with_cvmfs_cache_headers(
    reference_nginx: Nginx, reference_served: Path, data_object: Path
) -> None:
    http = urllib3.PoolManager(retries=False)
    manifest = http.request("GET", f"{reference_nginx.repo_url(FQRN)}/.cvmfspublished")
    assert manifest.status == 200
    assert manifest.data == (reference_served / ".cvmfspublished").read_bytes()
    assert manifest.headers["Cache-Control"] == "max-age=61"
    assert manifest.headers["Content-Type"] == "application/x-cvmfs"
    assert "Last-Modified" not in manifest.headers
    assert "ETag" not in manifest.headers

    url = _object_url(reference_nginx, reference_served, data_object)
    obj = http.request("GET", url, headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert obj.status == 200  # If-Modified-Since is ignored: never a 304
    assert obj.data == data_object.read_bytes()
    assert obj.headers["Cache-Control"] == "max-age=259200"
    assert obj.headers["Content-Type"] == "application/octet-stream"
    assert "Last-Modified" not in obj.headers

    part = http.request("GET", url, headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.data == data_object.read_bytes()[100:200]

    outside = http.request("GET", f"{reference_nginx.url}/keys/{FQRN}.pub")
    assert outside.status == 404  # only /cvmfs/ is served

    path = url.removeprefix(reference_nginx.url)
    records = _origin_requests(reference_nginx, path, expect=4)
    size = data_object.stat().st_size
    assert [(r.method, r.status, r.bytes, r.range) for r in records] == [
        ("GET", 200, size, None),
        ("GET", 206, 100, "bytes=100-199"),
    ]


@pytest.mark.service
def test_nginx_never_serves_key_files_or_the_staging_area(
    nginx_factory: Callable[..., Nginx], tmp_path: Path
) -> None:
    # docs/nginx.conf (the same text as the fixture's, checked below) refuses key material by
    # name, wherever it sits in the served tree.
    served = tmp_path / "cvmfs" / FQRN
    secrets = [
        f"{FQRN}.key",
        f"{FQRN}.masterkey",
        f"{FQRN}.crt",
        f"{FQRN}.gw",
        "nested/dir/signing.pem",
        "nested/dir/OTHER.KEY",
        "data/txn/partial.tmp",
    ]
    for name in [*secrets, "nested/dir/model.onnx", "data/ab/cdef"]:
        (served / name).parent.mkdir(parents=True, exist_ok=True)
        (served / name).write_bytes(b"secret " + name.encode())
    nginx = nginx_factory(tmp_path)
    http = urllib3.PoolManager(retries=False)
    for name in secrets:
        answer = http.request("GET", f"{nginx.repo_url(FQRN)}/{name}")
        assert answer.status in (403, 404), name
        assert b"secret" not in answer.data, name
    for name in ("nested/dir/model.onnx", "data/ab/cdef"):
        answer = http.request("GET", f"{nginx.repo_url(FQRN)}/{name}")
        assert answer.status == 200 and answer.data == b"secret " + name.encode(), name


# --------------------------------------------------------------------------------------------
# Squid
# --------------------------------------------------------------------------------------------


@pytest.mark.service
def test_squid_fetches_a_data_object_from_the_origin_once(
    reference_nginx: Nginx,
    squid_factory: Callable[..., Squid],
    reference_served: Path,
    data_object: Path,
) -> None:
    squid = squid_factory()
    proxy = urllib3.ProxyManager(squid.url, retries=False)
    url = _object_url(reference_nginx, reference_served, data_object)
    bodies = [proxy.request("GET", url).data for _ in range(2)]
    assert bodies == [data_object.read_bytes()] * 2

    origin = _origin_requests(reference_nginx, url.removeprefix(reference_nginx.url), expect=1)
    assert len(origin) == 1, reference_nginx.logs()
    seen = _squid_requests(squid, url, expect=2)
    assert [r.hit for r in seen] == [False, True], seen
    assert seen[0].result == "TCP_MISS"
    assert seen[1].status == 200


@pytest.mark.service
def test_squid_caches_the_manifest_for_its_61_seconds(
    reference_nginx: Nginx, squid_factory: Callable[..., Squid], reference_served: Path
) -> None:
    squid = squid_factory()
    proxy = urllib3.ProxyManager(squid.url, retries=False)
    url = f"{reference_nginx.repo_url(FQRN)}/.cvmfspublished"
    for _ in range(3):
        assert proxy.request("GET", url).data == (reference_served / ".cvmfspublished").read_bytes()
    assert len(_origin_requests(reference_nginx, f"/cvmfs/{FQRN}/.cvmfspublished", 1)) == 1
    assert [r.hit for r in _squid_requests(squid, url, expect=3)] == [False, True, True]


@pytest.mark.service
def test_a_range_request_makes_squid_cache_the_whole_object(
    reference_nginx: Nginx,
    squid_factory: Callable[..., Squid],
    reference_served: Path,
    data_object: Path,
) -> None:
    squid = squid_factory()
    proxy = urllib3.ProxyManager(squid.url, retries=False)
    url = _object_url(reference_nginx, reference_served, data_object)
    data = data_object.read_bytes()
    first = proxy.request("GET", url, headers={"Range": "bytes=0-9"})
    assert (first.status, first.data) == (206, data[:10])
    second = proxy.request("GET", url, headers={"Range": "bytes=1000-1999"})
    assert (second.status, second.data) == (206, data[1000:2000])

    path = url.removeprefix(reference_nginx.url)
    origin = _origin_requests(reference_nginx, path, expect=1)
    # range_offset_limit -1: Squid asked nginx for the whole object, without a Range header,
    # and answered the second range from that same fetch.
    assert [(r.status, r.range, r.bytes) for r in origin] == [(200, None, len(data))]
    # A plain GET afterwards is answered from the cache as well.
    assert proxy.request("GET", url).data == data
    assert len(_origin_requests(reference_nginx, path)) == 1
    seen = _squid_requests(squid, url, expect=3)
    assert [r.contacted_upstream for r in seen] == [True, False, False], seen


@pytest.mark.service
def test_chained_squids_share_the_parent_cache(
    reference_nginx: Nginx,
    squid_factory: Callable[..., Squid],
    reference_served: Path,
    data_object: Path,
) -> None:
    regional = squid_factory()
    site_a = squid_factory(parent=regional)
    site_b = squid_factory(parent=regional)
    url = _object_url(reference_nginx, reference_served, data_object)
    for site in (site_a, site_b):
        body = urllib3.ProxyManager(site.url, retries=False).request("GET", url).data
        assert body == data_object.read_bytes()

    assert len(_origin_requests(reference_nginx, url.removeprefix(reference_nginx.url), 1)) == 1
    (via_a,) = _squid_requests(site_a, url, expect=1)
    assert via_a.hierarchy.endswith("PARENT/127.0.0.1"), via_a  # went through the regional one
    assert [r.hit for r in _squid_requests(regional, url, expect=2)] == [False, True]


# --------------------------------------------------------------------------------------------
# docker-registry
# --------------------------------------------------------------------------------------------


@pytest.mark.service
def test_docker_registry_answers_the_v2_api(docker_registry: DockerRegistry) -> None:
    http = urllib3.PoolManager(retries=False)
    base = http.request("GET", f"{docker_registry.url}/v2/")
    assert base.status == 200
    assert base.headers["Docker-Distribution-Api-Version"] == "registry/2.0"

    # A monolithic blob upload and read-back: the storage folder works.
    blob = b"cvmfs-ml test blob\n"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    start = http.request("POST", f"{docker_registry.url}/v2/test/blob/blobs/uploads/")
    assert start.status == 202
    location = start.headers["Location"]
    if location.startswith("/"):
        location = docker_registry.url + location
    sep = "&" if "?" in location else "?"
    put = http.request(
        "PUT",
        f"{location}{sep}digest={digest}",
        body=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.status == 201
    got = http.request("GET", f"{docker_registry.url}/v2/test/blob/blobs/{digest}")
    assert (got.status, got.data) == (200, blob)


# --------------------------------------------------------------------------------------------
# Start-up errors
# --------------------------------------------------------------------------------------------


@pytest.mark.service
def test_a_taken_port_is_refused_before_starting(
    nginx_binary: str, reference_repo: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceError, match=f"port {port} is already in use"):
            Nginx(reference_repo, port=port, workdir=tmp_path / "nginx")


class _BrokenNginx(Nginx):
    def _prepare(self) -> None:
        super()._prepare()
        self.conf_path.write_text(self.conf_path.read_text() + "\nno_such_directive on;\n")


@pytest.mark.service
def test_a_service_that_dies_while_starting_reports_its_log(
    nginx_binary: str, reference_repo: Path, tmp_path: Path
) -> None:
    with pytest.raises(ServiceError) as failure:
        _BrokenNginx(reference_repo, workdir=tmp_path / "nginx")
    message = str(failure.value)
    assert "exited with status" in message
    assert 'unknown directive "no_such_directive"' in message  # nginx's own words, from its log


# --------------------------------------------------------------------------------------------
# Log parsers
# --------------------------------------------------------------------------------------------


def test_parse_nginx_access_log() -> None:
    text = (
        '127.0.0.1 - [2026-11-22T01:09:35+00:00] "GET /cvmfs/a/data/01/x HTTP/1.1" 206 10 '
        'range="bytes=0-9" rt=0.000 ua="curl/7.88.1"\n'
        '127.0.0.1 - [2026-11-22T01:09:35+00:00] "HEAD /cvmfs/a/.cvmfspublished HTTP/1.1" 200 0 '
        'range="-" rt=0.000 ua="-"\n'
        "garbage line\n"
    )
    assert parse_nginx_access_log(text) == [
        AccessRecord("GET", "/cvmfs/a/data/01/x", 206, 10, "bytes=0-9"),
        AccessRecord("HEAD", "/cvmfs/a/.cvmfspublished", 200, 0, None),
    ]


def test_parse_squid_access_log() -> None:
    text = (
        "1795309804.546      0 127.0.0.1 NONE_NONE/000 0 - error:transaction-end-before-headers"
        " - HIER_NONE/- -\n"
        "1795309807.059      3 127.0.0.1 TCP_MISS/200 550011 GET http://h:1/cvmfs/a/data/x"
        " - HIER_DIRECT/127.0.0.1 application/octet-stream\n"
        "1795309807.068      0 127.0.0.1 TCP_MEM_HIT/206 514 GET http://h:1/cvmfs/a/data/x"
        " - HIER_NONE/- application/octet-stream\n"
        "1795309807.070      0 127.0.0.1 TCP_REFRESH_MODIFIED/200 514 GET http://h:1/x"
        " - HIER_DIRECT/127.0.0.1 -\n"
    )
    records = parse_squid_access_log(text)
    assert [(r.result, r.status, r.bytes, r.url) for r in records] == [
        ("TCP_MISS", 200, 550011, "http://h:1/cvmfs/a/data/x"),
        ("TCP_MEM_HIT", 206, 514, "http://h:1/cvmfs/a/data/x"),
        ("TCP_REFRESH_MODIFIED", 200, 514, "http://h:1/x"),
    ]
    assert [r.hit for r in records] == [False, True, False]
    assert records[0].hierarchy == "HIER_DIRECT/127.0.0.1"


# --------------------------------------------------------------------------------------------
# docs/ examples agree with what the fixtures run
# --------------------------------------------------------------------------------------------


def _statements(config: str) -> list[str]:
    """nginx/Squid config text without comments, as whitespace-normalised tokens."""
    text = "\n".join(line.split("#", 1)[0] for line in config.splitlines())
    return re.sub(r"\s+", " ", text).strip().split(" ")


def test_docs_nginx_conf_is_the_fixture_template() -> None:
    documented = (DOCS / "nginx.conf").read_text()
    template = nginx_site_config("/srv", "80", "/var/log/nginx/cvmfs-access.log")
    assert _statements(documented) == _statements(template)


@pytest.mark.service
def test_docs_nginx_conf_is_accepted_by_nginx(nginx_binary: str, tmp_path: Path) -> None:
    site = (DOCS / "nginx.conf").read_text()
    site = site.replace("/var/log/nginx/cvmfs-access.log", str(tmp_path / "access.log"))
    site = site.replace("listen 80;", "listen 127.0.0.1:1;")  # -t does not bind
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_main_config(site, tmp_path, run_as_root=False))
    result = subprocess.run(
        [nginx_binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_docs_squid_conf_contains_the_cvmfs_policy() -> None:
    lines = {
        " ".join(line.split("#", 1)[0].split())
        for line in (DOCS / "squid.conf").read_text().splitlines()
    }
    missing = [line for line in CVMFS_SQUID_POLICY if line not in lines]
    assert missing == []
    # maximum_object_size must come before cache_dir, which copies it as its own limit.
    text = (DOCS / "squid.conf").read_text()
    assert text.index("\nmaximum_object_size ") < text.index("\ncache_dir ")


@pytest.mark.service
def test_docs_squid_conf_is_accepted_by_squid(squid_binary: str) -> None:
    result = subprocess.run(
        [squid_binary, "-k", "parse", "-f", str(DOCS / "squid.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
