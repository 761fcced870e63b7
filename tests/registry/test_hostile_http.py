"""A hostile client against the registry's HTTP server itself, before any route runs (a
request head without end, or one that never finishes arriving), and against its listings.

Before, the server (uvicorn's httptools protocol) kept every header byte it was sent, without
a limit, and waited for the rest of a head for ever once its first byte had come: one client
could grow the registry's memory as it liked, or hold connections (and file descriptors)
open with a few bytes each.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from urllib.parse import urlsplit

from cvmfs_ml.models.sources.oci_client import OCI_INDEX

from ._helpers import HTTP, RegistryEnv, RegistryServer, get, text, wait_until


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=60)


def _answer(conn: socket.socket) -> bytes:
    """What the server sent before it closed the connection (b"" when it reset it)."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_request_head_without_end_is_refused_431(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    conn = _connect(server.url)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sent, refused = 0, False
    try:
        conn.sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        while sent < 96 * 2**20:  # the old server took all of it, and answered 200 after
            conn.sendall(b"a" * 2**20)
            sent += 2**20
        conn.sendall(b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        refused = True
    answer = _answer(conn)
    conn.close()
    assert refused or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert not answer or answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # The server's socket buffer (up to tcp_rmem's 32 MiB here) takes what it never reads
    # before its reset arrives; the old server read all 96 MiB.
    assert sent < 48 * 2**20, f"the server read {sent} bytes of one request head"
    assert text(get(server, "/pubapi/ping")) == "OK\n"  # and it serves the next client
    large = HTTP.request("GET", f"{server.url}/pubapi/ping", headers={"X-Large": "a" * 40_000})
    assert large.status == 200  # a large head that fits is served as before


def test_a_request_head_that_stops_arriving_is_closed(registry_env: RegistryEnv) -> None:
    """The head must arrive within ``upload_low_speed_seconds`` (the window bodies get)."""
    registry_env.set_config(upload_low_speed_seconds=1)
    server = registry_env.start()
    conn = _connect(server.url)
    conn.sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # and nothing more
    conn.settimeout(0.1)
    answer = bytearray()

    def closed() -> bool:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        answer.extend(chunk)
        return not chunk

    try:
        wait_until(closed, 60, "the server still waits for the rest of the request head")
    finally:
        conn.close()
    assert not answer or answer.startswith(b"HTTP/1.1 408"), bytes(answer[:200])
    assert text(get(server, "/pubapi/ping")) == "OK\n"


def test_a_tags_listing_is_a_page_of_at_most_1000_with_a_link_to_the_next(
    registry_env: RegistryEnv,
) -> None:
    """Without ``n`` (or with ``n=10000``) the whole list came back in one answer, read whole
    from the database, however many tags the repository had: memory and time per request
    grew with every push. Pages are at most 1000 (distribution's ``tags.maxtags``), with a
    ``Link`` to the next one (the spec lets a registry return fewer with a Link)."""
    server = registry_env.start()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    headers = {"Authorization": f"Bearer {registry_env.tokens['writer']}",
               "Content-Type": OCI_INDEX}  # fmt: skip
    every = [f"t{i:04d}" for i in range(1010)]
    for start in range(0, len(every), 16):
        query = "&".join(f"tag={t}" for t in every[start + 1 : start + 16])
        put = HTTP.request("PUT", f"{server.url}/v2/grp/many/manifests/{every[start]}?{query}",
                           body=index, headers=headers)  # fmt: skip
        assert put.status == 201, put.data
    for first in ("/v2/grp/many/tags/list", "/v2/grp/many/tags/list?n=10000"):
        listed, path, pages = [], first, 0
        while path:
            page = get(server, path)
            assert page.status == 200, page.data
            tags = json.loads(page.data)["tags"]
            assert len(tags) <= 1000, f"{len(tags)} tags in one answer"
            listed += tags
            link = page.headers.get("Link")
            path = link.split(">")[0].lstrip("<") if link else ""
            pages += 1
        assert listed == every and pages == 2
    small = get(server, "/v2/grp/many/tags/list?n=3&last=t0005")
    assert json.loads(small.data)["tags"] == ["t0006", "t0007", "t0008"]
    assert 'last=t0008>; rel="next"' in small.headers["Link"]


def test_referrers_are_a_page_of_at_most_1000_with_a_link_to_the_next(
    registry_env: RegistryEnv,
) -> None:
    """Every manifest naming a subject came back in one answer, read whole: as many as
    were pushed. Pages of at most 1000 with a ``Link`` (the spec's pagination), the
    ``artifactType`` filter applied to every page."""
    server = registry_env.start()
    headers = {"Authorization": f"Bearer {registry_env.tokens['writer']}",
               "Content-Type": OCI_INDEX}  # fmt: skip
    subject = {"mediaType": OCI_INDEX, "digest": "sha256:" + "0" * 64, "size": 2}
    pushed = []
    for i in range(1005):
        kind = "application/vnd.sig" if i % 2 else "application/vnd.sbom"
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                           "artifactType": kind, "subject": subject,
                           "annotations": {"i": str(i)}}).encode()  # fmt: skip
        put = HTTP.request("PUT", f"{server.url}/v2/grp/refs/manifests/sha256:"
                           f"{hashlib.sha256(body).hexdigest()}", body=body, headers=headers)
        assert put.status == 201, put.data
        pushed.append((put.headers["Docker-Content-Digest"], kind))
    for query, expected in (("", sorted(d for d, _ in pushed)),
                            ("?artifactType=application/vnd.sig",
                             sorted(d for d, k in pushed if k == "application/vnd.sig"))):
        listed, path = [], f"/v2/grp/refs/referrers/{subject['digest']}{query}"
        while path:
            page = get(server, path)
            assert page.status == 200, page.data
            found = json.loads(page.data)["manifests"]
            assert len(found) <= 1000, f"{len(found)} referrers in one answer"
            listed += [m["digest"] for m in found]
            link = page.headers.get("Link")
            path = link.split(">")[0].lstrip("<") if link else ""
        assert listed == expected


def _metric(server: RegistryServer, name: str) -> float:
    answer = HTTP.request("GET", f"{server.url}/metrics", headers={"Connection": "close"})
    found = re.search(rf"^{re.escape(name)} (\S+)$", answer.data.decode(), re.M)
    return float(found.group(1)) if found else -1.0


def test_connections_past_max_connections_are_refused_503(registry_env: RegistryEnv) -> None:
    """Any number of connections were taken, each a file descriptor the registry also needs
    for its files (a few hundred clients opening connections and sending a byte now and
    then could leave it none). Past ``max_connections`` a connection is answered 503."""
    registry_env.set_config(max_connections=3)
    server = registry_env.start()
    HTTP.clear()  # the pooled connection of the start's health checks
    gauge = "cvmfs_registry_connections"
    wait_until(lambda: _metric(server, gauge) == 1, 60, "connections left open")  # its own
    held: list[socket.socket] = []

    def refused() -> bytes:
        extra = _connect(server.url)
        extra.sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = _answer(extra)
        extra.close()
        return answer if answer.startswith(b"HTTP/1.1 503") else b""

    try:
        answer = b""
        while not answer and len(held) < 20:  # 3, or one more while a probe's closes
            held.append(_connect(server.url))
            held[-1].sendall(b"GET /pubapi/ping HTTP/1.1\r\nHost: x\r\n")  # and no more
            answer = refused()
        assert answer, f"{len(held)} connections waiting for the rest of their heads, and more"
        assert b"max_connections" in answer and b"retry-after: 5" in answer.lower()
    finally:
        for conn in held:
            conn.close()
    wait_until(lambda: _metric(server, gauge) == 1, 60, "held connections not released")
    assert text(get(server, "/pubapi/ping")) == "OK\n"
    assert _metric(server, 'cvmfs_registry_errors_total{kind="connections"}') >= 1



def test_a_content_range_of_thousands_of_digits_is_416_not_a_server_error(
    registry_env: RegistryEnv,
) -> None:
    """Python refuses to turn more than 4300 digits into an int: such a Content-Range start
    raised out of the route, a 500 with a traceback in the log for one header."""
    server = registry_env.start()
    auth = {"Authorization": f"Bearer {registry_env.tokens['writer']}"}
    huge = {**auth, "Content-Range": f"{'1' * 5000}-{'2' * 5000}"}
    oci = HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/", headers=auth)
    answer = HTTP.request("PATCH", server.url + oci.headers["Location"], body=b"x", headers=huge)
    assert answer.status == 416, answer.data
    resumable = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/x", headers=auth)
    answer = HTTP.request("PATCH", server.url + resumable.headers["Location"], body=b"x",
                          headers=huge)  # fmt: skip
    assert answer.status == 416, answer.data
    assert json.loads(answer.data)["offset"] == 0


def _closed_by_server(conn: socket.socket) -> bool:
    conn.settimeout(0.1)
    try:
        return not conn.recv(65536)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_that_sends_nothing_is_closed(registry_env: RegistryEnv) -> None:
    """uvicorn times a connection only after a response (keep-alive): one that never sent a
    byte was held for ever, so silent connections could take every ``max_connections``
    place. The head's window runs from the connection's start; one past
    ``max_connections`` that sends nothing is closed after a second."""
    registry_env.set_config(upload_low_speed_seconds=1, max_connections=2)
    server = registry_env.start()
    HTTP.clear()  # the pooled connection of the start's health checks
    silent = [_connect(server.url) for _ in range(4)]
    try:
        for conn in silent:
            wait_until(lambda conn=conn: _closed_by_server(conn), 60,
                       "a connection that sent nothing is still open")  # fmt: skip
    finally:
        for conn in silent:
            conn.close()
    assert text(get(server, "/pubapi/ping")) == "OK\n"
