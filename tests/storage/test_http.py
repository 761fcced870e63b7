"""The built-in repository server (``cvmfs-ml serve``), tested on the upstream reference repo.

Everything goes over a real loopback socket with ``http.client``, which sends request targets
verbatim, so traversal attempts reach the server exactly as written.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_ml.errors import ConfigError
from cvmfs_ml.storage.http import RepositoryServer, RequestRecord, parse_range
from cvmfs_ml.testing import parse_nginx_access_log

FQRN = "ref.test.local"
BASE = f"/cvmfs/{FQRN}"


@pytest.fixture
def root(reference_repo: Path) -> Path:
    """The folder the server is given: it holds the repository folder ``ref.test.local/``."""
    return reference_repo / "cvmfs"


@pytest.fixture
def server(root: Path) -> Iterator[RepositoryServer]:
    with RepositoryServer(root) as srv:
        yield srv


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / FQRN / "data").rglob("*") if p.is_file())


@pytest.fixture
def big_object(root: Path) -> Path:
    """A data object larger than the small-body threshold, so it goes out with sendfile."""
    return max(_objects(root), key=lambda p: p.stat().st_size)


@pytest.fixture
def small_object(root: Path) -> Path:
    return min((p for p in _objects(root) if p.stat().st_size > 0), key=lambda p: p.stat().st_size)


def _url_path(root: Path, path: Path) -> str:
    return "/cvmfs/" + path.relative_to(root).as_posix()


def _get(
    server: RepositoryServer, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_manifest_is_served_with_dot_file_headers(server: RepositoryServer, root: Path) -> None:
    response, body = _get(server, f"{BASE}/.cvmfspublished")
    assert response.status == 200
    assert body == (root / FQRN / ".cvmfspublished").read_bytes()
    assert response.getheader("Content-Type") == "application/x-cvmfs"
    assert response.getheader("Cache-Control") == "max-age=61"
    assert response.getheader("Content-Length") == str(len(body))
    assert response.getheader("Last-Modified") is None
    assert response.getheader("ETag") is None


@pytest.mark.parametrize("name", [".cvmfswhitelist", ".cvmfsreflog", ".cvmfs_master_replica"])
def test_every_dot_file_is_short_lived(server: RepositoryServer, root: Path, name: str) -> None:
    response, body = _get(server, f"{BASE}/{name}")
    assert response.status == 200
    assert body == (root / FQRN / name).read_bytes()
    assert response.getheader("Cache-Control") == "max-age=61"
    assert response.getheader("Content-Type") == "application/x-cvmfs"


@pytest.mark.parametrize("which", ["big_object", "small_object"])
def test_data_objects_are_long_lived(
    server: RepositoryServer, root: Path, which: str, request: pytest.FixtureRequest
) -> None:
    obj: Path = request.getfixturevalue(which)
    response, body = _get(server, _url_path(root, obj))
    assert response.status == 200
    assert body == obj.read_bytes()
    assert response.getheader("Content-Length") == str(obj.stat().st_size)
    assert response.getheader("Cache-Control") == "max-age=259200"
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("Last-Modified") is None


def test_if_modified_since_is_ignored(server: RepositoryServer, root: Path) -> None:
    future = "Fri, 01 Jan 2100 00:00:00 GMT"
    response, body = _get(server, f"{BASE}/.cvmfspublished", {"If-Modified-Since": future})
    assert response.status == 200
    assert body == (root / FQRN / ".cvmfspublished").read_bytes()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=10-19", (10, 20)),
        ("bytes=0-0", (0, 1)),
        ("bytes=100-", (100, None)),
        ("bytes=-7", (-7, None)),
        ("bytes=5-999999999999", (5, None)),  # the end is clipped to the file size
        ("BYTES = 1-2", (1, 3)),
    ],
)
def test_single_ranges_answer_206(
    server: RepositoryServer,
    root: Path,
    big_object: Path,
    header: str,
    expected: tuple[int, int | None],
) -> None:
    data = big_object.read_bytes()
    size = len(data)
    start, stop = expected
    want = data[start:stop]
    first = start % size
    response, body = _get(server, _url_path(root, big_object), {"Range": header})
    assert response.status == 206
    assert body == want
    assert response.getheader("Content-Length") == str(len(want))
    assert response.getheader("Content-Range") == f"bytes {first}-{first + len(want) - 1}/{size}"


@pytest.mark.parametrize("header", ["bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=a-b", "x"])
def test_ranges_we_do_not_serve_give_the_whole_body(
    server: RepositoryServer, root: Path, small_object: Path, header: str
) -> None:
    response, body = _get(server, _url_path(root, small_object), {"Range": header})
    assert response.status == 200
    assert body == small_object.read_bytes()
    assert response.getheader("Content-Range") is None


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=-0"])
def test_unsatisfiable_range_is_416_and_keeps_the_connection(
    server: RepositoryServer, root: Path, small_object: Path, header: str
) -> None:
    size = small_object.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", _url_path(root, small_object), headers={"Range": header})
        response = conn.getresponse()
        response.read()
        assert response.status == 416
        assert response.getheader("Content-Range") == f"bytes */{size}"
        sock = conn.sock
        conn.request("GET", _url_path(root, small_object))
        again = conn.getresponse()
        assert again.read() == small_object.read_bytes()
        assert conn.sock is sock
    finally:
        conn.close()


def test_parse_range_edge_cases() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=-20", 10) == (0, 10)  # a suffix longer than the file: all of it
    assert parse_range("bytes=9-9", 10) == (9, 10)
    with pytest.raises(ValueError):
        parse_range("bytes=0-0", 0)  # nothing of an empty file can be satisfied
    with pytest.raises(ValueError):
        parse_range("bytes=10-", 10)


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/no-such-file",
        f"{BASE}/data/00/0000000000000000000000000000000000000000",
        f"{BASE}/data",  # a directory: no listings
        f"{BASE}/data/",
        BASE,
        "/cvmfs/",
        "/cvmfs/no.such.repo/.cvmfspublished",
        "/",
        f"/{FQRN}/.cvmfspublished",  # only /cvmfs/ is served
        f"{BASE}//.cvmfspublished",
        f"{BASE}/./.cvmfspublished",
        f"{BASE}/.cvmfspublished%00",
        f"{BASE}/%ff%fe",
    ],
)
def test_missing_or_non_file_paths_are_404(server: RepositoryServer, path: str) -> None:
    response, body = _get(server, path)
    assert response.status == 404
    assert response.getheader("Content-Length") == str(len(body))


@pytest.mark.parametrize(
    "path",
    [
        "/cvmfs/../README.md",
        f"{BASE}/../../README.md",
        f"{BASE}/../../keys/{FQRN}.pub",
        f"{BASE}/%2e%2e/%2e%2e/README.md",
        f"{BASE}/..%2f..%2fREADME.md",
        "/cvmfs/..%2fREADME.md",
        f"/cvmfs/{FQRN}/data/../../../README.md",
    ],
)
def test_paths_leaving_the_root_are_refused(
    server: RepositoryServer, reference_repo: Path, path: str
) -> None:
    assert (reference_repo / "README.md").is_file()  # the target exists, so 404 means refused
    response, body = _get(server, path)
    assert response.status == 404
    assert b"CernVM-FS" not in body


def test_symlinks_are_followed_only_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    repo = root / "fq.dn"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "inside").write_bytes(b"inside")
    (repo / ".cvmfspublished").write_bytes(b"C0\n")  # only repositories are served
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (repo / "to-inside").symlink_to("data/inside")
    (repo / "to-outside").symlink_to(outside / "secret")
    (repo / "dir-outside").symlink_to(outside)
    (repo / "dangling").symlink_to("nowhere")
    with RepositoryServer(root) as server:
        response, body = _get(server, "/cvmfs/fq.dn/to-inside")
        assert (response.status, body) == (200, b"inside")
        for path in ("to-outside", "dir-outside/secret", "dangling"):
            response, body = _get(server, f"/cvmfs/fq.dn/{path}")
            assert response.status == 404, path
            assert b"secret" not in body


def test_keep_alive_serves_two_requests_on_one_connection(
    server: RepositoryServer, root: Path, big_object: Path
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", f"{BASE}/.cvmfspublished")
        first = conn.getresponse()
        assert first.read() == (root / FQRN / ".cvmfspublished").read_bytes()
        assert first.getheader("Connection") is None  # HTTP/1.1: persistent unless "close"
        sock = conn.sock
        assert sock is not None
        conn.request("GET", _url_path(root, big_object))
        second = conn.getresponse()
        assert second.read() == big_object.read_bytes()
        # http.client reconnects silently when the server closed; the same socket proves not.
        assert conn.sock is sock
    finally:
        conn.close()
    assert server.wait_for_requests(2, timeout=60) == 2


def test_head_sends_headers_without_a_body(
    server: RepositoryServer, root: Path, big_object: Path
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("HEAD", _url_path(root, big_object))
        head = conn.getresponse()
        assert head.status == 200
        assert head.read() == b""
        assert head.getheader("Content-Length") == str(big_object.stat().st_size)
        assert head.getheader("Cache-Control") == "max-age=259200"
        # Had a body been sent anyway, this response would be parsed out of it and fail.
        conn.request("GET", f"{BASE}/.cvmfspublished")
        after = conn.getresponse()
        assert after.status == 200
        assert after.read() == (root / FQRN / ".cvmfspublished").read_bytes()
    finally:
        conn.close()


def test_absolute_form_target_is_accepted(server: RepositoryServer, root: Path) -> None:
    response, body = _get(server, f"{server.url}{BASE}/.cvmfswhitelist")
    assert response.status == 200
    assert body == (root / FQRN / ".cvmfswhitelist").read_bytes()


def test_other_methods_are_not_implemented(server: RepositoryServer) -> None:
    response, _ = _get(server, f"{BASE}/.cvmfspublished", method="PUT")
    assert response.status == 501


def test_offsets_beyond_4_gib_in_a_sparse_file(tmp_path: Path) -> None:
    repo = tmp_path / "fq.dn" / "data" / "ab"
    repo.mkdir(parents=True)
    (tmp_path / "fq.dn" / ".cvmfspublished").write_bytes(b"C0\n")  # only repositories are served
    big = repo / "cdef"
    size = 5 * 2**30
    mark = 2**32
    with open(big, "wb") as handle:
        handle.truncate(size)
        handle.seek(size - 4)
        handle.write(b"tail")
        handle.seek(mark + 2)  # just past 4 GiB, where a 32-bit offset would wrap around
        handle.write(b"mark")
    with RepositoryServer(tmp_path) as server:
        response, body = _get(server, "/cvmfs/fq.dn/data/ab/cdef", {"Range": "bytes=-6"})
        assert response.status == 206
        assert body == b"\0\0tail"
        assert response.getheader("Content-Range") == f"bytes {size - 6}-{size - 1}/{size}"
        head, _ = _get(server, "/cvmfs/fq.dn/data/ab/cdef", method="HEAD")
        assert head.getheader("Content-Length") == str(size)
        response, body = _get(
            server, "/cvmfs/fq.dn/data/ab/cdef", {"Range": f"bytes={mark}-{mark + 5}"}
        )
        assert response.status == 206
        assert body == b"\0\0mark"


def test_access_log_and_callback(tmp_path: Path, root: Path, small_object: Path) -> None:
    log = tmp_path / "access.log"
    seen: list[RequestRecord] = []
    with RepositoryServer(root, access_log=log, on_request=seen.append) as server:
        _get(server, _url_path(root, small_object), {"Range": "bytes=0-3"})
        _get(server, f"{BASE}/missing")
        _get(server, f"{BASE}/.cvmfspublished", method="HEAD")
    # A line is written after its response went out, so the order may differ from ours.
    records = sorted(parse_nginx_access_log(log.read_text()), key=lambda r: r.status)
    assert [(r.method, r.status, r.bytes, r.range) for r in records] == [
        ("HEAD", 200, 0, None),
        ("GET", 206, 4, "bytes=0-3"),
        ("GET", 404, len(b"404 Not Found\n"), None),
    ]
    assert records[1].path == _url_path(root, small_object)
    assert sorted((r.path, r.status, r.bytes) for r in seen) == sorted(
        (r.path, r.status, r.bytes) for r in records
    )


def test_concurrent_clients(server: RepositoryServer, root: Path) -> None:
    objects = _objects(root)[:16]
    failures: list[str] = []

    def fetch(obj: Path) -> None:
        response, body = _get(server, _url_path(root, obj))
        if response.status != 200 or body != obj.read_bytes():
            failures.append(str(obj))

    threads = [threading.Thread(target=fetch, args=(obj,)) for obj in objects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    # The server counts a request after its body is sent, which may be after the client read it.
    assert server.wait_for_requests(len(objects), timeout=60) == len(objects)


def test_stop_closes_idle_connections_and_the_port(root: Path) -> None:
    server = RepositoryServer(root).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"{BASE}/.cvmfspublished")
    conn.getresponse().read()
    idle = conn.sock
    assert idle is not None
    server.stop()
    assert idle.recv(1) == b""  # the server hung up the idle keep-alive connection
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        _get(server, f"{BASE}/.cvmfspublished")
    server.stop()  # idempotent


def test_port_zero_picks_a_port_before_serving(root: Path) -> None:
    server = RepositoryServer(root, port=0)
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        RepositoryServer(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError):
        RepositoryServer(tmp_path / "file")


def test_serve_forever_returns_after_stop_from_another_thread(root: Path) -> None:
    server = RepositoryServer(root)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        response, _ = _get(server, f"{BASE}/.cvmfspublished")
        assert response.status == 200
    finally:
        server.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert os.path.isdir(root)
