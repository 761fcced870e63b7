"""Bounds on what one token's uploads can hold: bodies received at once (memory) and upload
sessions left open (disk), against the real registry process with real concurrent requests.

Before, each OCI or resumable upload receiving a body held up to 12 MiB of buffers for as long
as its client trickled, with no cap on how many ran at once; and upload sessions were pruned
only at startup, after a week, so a token could open them without end and fill the disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from contextlib import ExitStack

import urllib3

from ._helpers import HTTP, RegistryEnv, RegistryServer, get, start_body, wait_until


def _auth(env: RegistryEnv, token: str = "writer") -> dict[str, str]:
    return {"Authorization": f"Bearer {env.tokens[token]}"}


def _metric(server: RegistryServer, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", get(server, "/metrics").data.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def _hold_bodies(env: RegistryEnv, server: RegistryServer, stack: ExitStack,
                 count: int) -> list[socket.socket]:  # fmt: skip
    """``count`` OCI PATCHes that sent part of their body and wait: uploads receiving."""
    held = []
    for _ in range(count):
        start = HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/",
                             headers=_auth(env))  # fmt: skip
        assert start.status == 202, start.data
        conn = start_body(server.url + start.headers["Location"],
                          {**_auth(env), "Content-Range": "0-999999"}, 1_000_000)  # fmt: skip
        stack.callback(conn.close)
        conn.sendall(b"x" * 1000)
        held.append(conn)
    return held


def _monolithic(env: RegistryEnv, server: RegistryServer) -> urllib3.BaseHTTPResponse:
    body = b"a small blob"
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/?digest={digest}",
                        body=body, headers=_auth(env))  # fmt: skip


def test_uploads_receiving_at_once_are_bounded_by_default(registry_env: RegistryEnv) -> None:
    """The default bound (32): the 33rd body at once is refused, not buffered."""
    server = registry_env.start()
    with ExitStack() as stack:
        _hold_bodies(registry_env, server, stack, 32)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 32, 60,
                   lambda: get(server, "/metrics").data.decode())  # fmt: skip
        refused = _monolithic(registry_env, server)
    assert refused.status == 429, "a 33rd upload body at once was accepted"
    assert json.loads(refused.data)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert int(refused.headers["Retry-After"]) > 0


def test_past_a_small_bound_oci_and_resumable_bodies_get_429_until_a_place_frees(
    registry_env: RegistryEnv,
) -> None:
    registry_env.set_config(max_receiving_uploads=2)
    server = registry_env.start()
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/resumed",
                           headers=_auth(registry_env))  # fmt: skip
    assert created.status == 201, created.data
    resumable = server.url + created.headers["Location"]
    piece = {**_auth(registry_env), "Content-Range": "0-4/5"}
    with ExitStack() as stack:
        held = _hold_bodies(registry_env, server, stack, 2)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 2, 60,
                   lambda: get(server, "/metrics").data.decode())  # fmt: skip
        oci = _monolithic(registry_env, server)
        assert oci.status == 429, oci.data
        assert json.loads(oci.data)["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert "max_receiving_uploads" in json.loads(oci.data)["errors"][0]["message"]
        assert 0 < int(oci.headers["Retry-After"]) <= 60
        refused = HTTP.request("PATCH", resumable, body=b"12345", headers=piece)
        assert refused.status == 429, refused.data
        assert "max_receiving_uploads" in json.loads(refused.data)["error"]
        assert int(refused.headers["Retry-After"]) > 0
        assert _metric(server, 'cvmfs_registry_errors_total{kind="busy"}') == 2
        held[0].close()  # a client that went away gives its place back
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60)
        sent = HTTP.request("PATCH", resumable, body=b"12345", headers=piece)
        assert sent.status == 202, sent.data
        assert json.loads(sent.data)["offset"] == 5
    wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 0, 60)
    assert _monolithic(registry_env, server).status == 201
