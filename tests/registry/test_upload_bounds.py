"""Bounds on what one token's uploads can hold: bodies received at once (memory) and upload
sessions left open (disk), against the real registry process with real concurrent requests.

Before, each OCI or resumable upload receiving a body held up to 12 MiB of buffers for as long
as its client trickled, with no cap on how many ran at once; and upload sessions were pruned
only at startup, after a week, so a token could open them without end and fill the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time as real_time
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
import urllib3

from cvmfs_ml.registry.oci_store import OciError, OciStore
from waiting import ManualClock

from ._helpers import HTTP, RegistryEnv, RegistryServer, get, make_tarball, start_body, wait_until
from .test_skopeo import _image_layout


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


def test_user_pub_bodies_count_toward_max_receiving_uploads(registry_env: RegistryEnv) -> None:
    """``/pubapi/publish`` and ``POST /api/v1/cids`` bodies take a place too, each refused in
    its API's own words: before, any number of them were received at once."""
    registry_env.set_config(max_receiving_uploads=1)
    server = registry_env.start()
    tarball = make_tarball({"a.txt": b"a\n"})

    def post(path: str) -> urllib3.BaseHTTPResponse:
        return HTTP.request("POST", server.url + path, body=tarball, headers=_auth(registry_env))

    def text(response: urllib3.BaseHTTPResponse) -> str:
        return response.data.decode()

    with ExitStack() as stack:
        held = _hold_bodies(registry_env, server, stack, 1)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60)
        pubapi = post("/pubapi/publish?cid=grp/busy")
        assert pubapi.status == 429, text(pubapi)
        assert text(pubapi).startswith("Too many requests: ")
        assert "max_receiving_uploads" in text(pubapi)
        assert int(pubapi.headers["Retry-After"]) > 0
        api = post("/api/v1/cids/grp/busy")
        assert api.status == 429, api.data
        assert "max_receiving_uploads" in json.loads(api.data)["error"]
        assert int(api.headers["Retry-After"]) > 0
        held[0].close()
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 0, 60)
        # A user-pub body being received holds the place against the OCI API as well.
        conn = start_body(f"{server.url}/pubapi/publish?cid=grp/held",
                          _auth(registry_env), 1_000_000, method="POST")  # fmt: skip
        stack.callback(conn.close)
        conn.sendall(b"x" * 1000)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60,
                   "a user-pub body being received is not counted")  # fmt: skip
        assert _monolithic(registry_env, server).status == 429
        conn.close()
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 0, 60)
    assert _metric(server, 'cvmfs_registry_errors_total{kind="busy"}') == 3
    assert text(post("/pubapi/publish?cid=grp/busy")) == "OK\n"


def test_manifest_bodies_count_toward_max_receiving_uploads(registry_env: RegistryEnv) -> None:
    """A manifest PUT's body (up to 4 MiB) is gathered in memory: any number were received
    at once. It takes a place as blob bodies do."""
    registry_env.set_config(max_receiving_uploads=1)
    server = registry_env.start()
    url = f"{server.url}/v2/grp/model/manifests/v1"
    headers = {**_auth(registry_env), "Content-Type": "application/vnd.oci.image.index.v1+json"}
    with ExitStack() as stack:
        _hold_bodies(registry_env, server, stack, 1)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60)
        refused = HTTP.request("PUT", url, body=b"{}", headers=headers)
        assert refused.status == 429, refused.data
        assert json.loads(refused.data)["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert int(refused.headers["Retry-After"]) > 0
        conn = stack.enter_context(closing(start_body(url, headers, 1_000_000, "PUT")))
        conn.sendall(b"{" + b" " * 1000)  # answered before the rest of it is read
        answer = conn.makefile("rb").readline()
    assert answer.startswith(b"HTTP/1.1 429"), answer
    wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 0, 60)
    index = b'{"schemaVersion": 2, "manifests": []}'
    assert HTTP.request("PUT", url, body=index, headers=headers).status == 201


def test_sessions_untouched_for_a_week_are_pruned_while_the_registry_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only at startup: a registry that runs for months freed nothing before."""
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.time", clock := ManualClock())
    store = OciStore(tmp_path / "oci")
    week_ago = real_time.time() - 8 * 86400

    def age(upload_id: str) -> None:
        for path in store.uploads.glob(f"{upload_id}*"):
            os.utime(path, (week_ago, week_ago))

    try:
        old, writing = store.start_upload("w", 3), store.start_upload("w", 3)
        age(old)
        age(writing)
        fresh = store.start_upload("w", 3)
        with pytest.raises(OciError) as refused:  # the old ones count until pruned
            store.start_upload("w", 3)
        assert refused.value.status == 429
        clock.now += 3600  # an hour later, the next session started prunes
        with store.claimed(writing):  # a request is writing it: kept, however old
            store.start_upload("w", 3)
        assert not list(store.uploads.glob(f"{old}*"))
        assert store.upload_size(fresh) == 0
        assert store.upload_size(writing) == 0
    finally:
        store.close()


def test_sessions_removed_under_the_registry_stop_counting(tmp_path: Path) -> None:
    """The uploads folder removed under a running registry (a tmp cleaner) is made again; the
    sessions it held must not keep their owner at the limit until a restart."""
    store = OciStore(tmp_path / "oci")
    try:
        store.start_upload("w", 2)
        store.start_upload("w", 2)
        store.uploads.rename(tmp_path / "removed")
        store.start_upload("w", 2)
        store.start_upload("w", 2)
        with pytest.raises(OciError):
            store.start_upload("w", 2)
    finally:
        store.close()


def _open_session(env: RegistryEnv, server: RegistryServer,
                  token: str = "writer") -> urllib3.BaseHTTPResponse:  # fmt: skip
    return HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/",
                        headers=_auth(env, token))  # fmt: skip


def test_one_token_cannot_open_sessions_without_end_by_default(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    for _ in range(100):
        assert _open_session(registry_env, server).status == 202
    refused = _open_session(registry_env, server)
    assert refused.status == 429, "a 101st open upload session of one token was accepted"
    assert json.loads(refused.data)["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_past_a_small_session_bound_one_token_gets_429_until_it_closes_one(
    registry_env: RegistryEnv,
) -> None:
    registry_env.set_config(max_upload_sessions=2)
    server = registry_env.start()
    first = _open_session(registry_env, server)
    assert first.status == 202
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/resumed",
                           headers=_auth(registry_env))  # fmt: skip
    assert created.status == 201, created.data  # resumable sessions count as well
    refused = _open_session(registry_env, server)
    assert refused.status == 429, refused.data
    message = json.loads(refused.data)["errors"][0]["message"]
    assert "max_upload_sessions" in message
    again = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/other",
                         headers=_auth(registry_env))  # fmt: skip
    assert again.status == 429 and "max_upload_sessions" in json.loads(again.data)["error"]
    assert _metric(server, 'cvmfs_registry_errors_total{kind="sessions"}') == 2
    assert _open_session(registry_env, server, "all").status == 202  # another token's own
    server.terminate()  # sessions outlive a restart, and so does their count
    server = registry_env.start()
    assert _open_session(registry_env, server).status == 429
    gone = HTTP.request("DELETE", server.url + first.headers["Location"],
                        headers=_auth(registry_env))  # fmt: skip
    assert gone.status == 204
    assert _monolithic(registry_env, server).status == 201  # a finished session frees too
    assert _open_session(registry_env, server).status == 202


def test_skopeo_retries_a_push_refused_for_max_receiving_uploads(
    registry_env: RegistryEnv, tmp_path: Path
) -> None:
    """skopeo 1.9 retries the 429 with ``--retry-times`` (without, it stops at once, saying
    ``toomanyrequests: ... max_receiving_uploads``); oras-go retries it by default."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        if os.environ.get("CI"):
            pytest.fail("skopeo is not installed; CI must provide it (.ci/install)")
        pytest.skip("skopeo is not installed")
    registry_env.set_config(max_receiving_uploads=1)
    server = registry_env.start()
    _image_layout(tmp_path / "image")
    with ExitStack() as stack:
        held = _hold_bodies(registry_env, server, stack, 1)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60)
        push = subprocess.Popen(
            [skopeo, "--insecure-policy", "copy", "--retry-times", "5", "--dest-tls-verify=false",
             "--dest-creds", f"ci:{registry_env.tokens['writer']}", f"oci:{tmp_path / 'image'}:1",
             f"docker://127.0.0.1:{server.port}/grp/img:1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        stack.callback(push.kill)
        wait_until(lambda: _metric(server, 'cvmfs_registry_errors_total{kind="busy"}') >= 1, 120)
        held[0].close()  # the place frees: the retried push goes through
        output, _ = push.communicate(timeout=300)
    assert push.returncode == 0, output
    assert get(server, "/v2/grp/img/manifests/1").status == 200


def test_a_client_back_after_its_retry_after_finds_its_connection_open(
    registry_env: RegistryEnv,
) -> None:
    """A client refused with 429 waits the Retry-After it was told, then sends again on the same
    connection (skopeo and oras-go do). The server closed idle connections after 5 s (uvicorn's
    default) and told clients to come back in 5 s: the retry met a connection closing under it
    ('write: broken pipe'), which skopeo does not retry, so the push failed now and then
    (test_skopeo_retries_a_push_refused_for_max_receiving_uploads on a loaded machine)."""
    registry_env.set_config(max_receiving_uploads=1)
    server = registry_env.start()
    body = b"a small blob"
    target = f"/v2/grp/model/blobs/uploads/?digest=sha256:{hashlib.sha256(body).hexdigest()}"
    with ExitStack() as stack:
        held = _hold_bodies(registry_env, server, stack, 1)
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 1, 60)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        stack.callback(conn.close)
        conn.request("POST", target, body=body, headers=_auth(registry_env))
        refused = conn.getresponse()
        refused.read()
        assert refused.status == 429
        wait = int(refused.headers["Retry-After"])
        held[0].close()
        wait_until(lambda: _metric(server, "cvmfs_registry_uploads_receiving") == 0, 60)
        # The client's own wait, as it was told (and a second more): the connection must not
        # close meanwhile. select returns as soon as it does (the old server's 5 s), else at
        # the deadline.
        closed, _, _ = select.select([conn.sock], [], [], wait + 1)
        assert not closed, f"the server closed the connection before Retry-After ({wait} s)"
        conn.request("POST", target, body=body, headers=_auth(registry_env))
        assert conn.getresponse().status == 201
