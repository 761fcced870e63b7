"""What unfinished uploads hold on the disk, and when it goes: open sessions (all of them
together, and abandoned ones pruned while the registry runs, whether or not sessions start),
and accepted bodies waiting in the queue.

Before, the running registry looked for abandoned sessions only when a new one started, so a
registry nobody opened sessions on any more kept its stale ones (and their disk) for ever.
"""

from __future__ import annotations

import json
import os
import time as real_time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import urllib3

from cvmfs_ml.registry.oci_store import PRUNE_SECONDS, OciStore
from waiting import ManualClock, wait_until

from ._helpers import FQRNS, HTTP, RegistryEnv, RegistryServer, get, make_tarball, post, text

WEEK_AGO = real_time.time() - 8 * 86400


def _age(store: OciStore, upload_id: str) -> None:
    """The session's files as a session nobody wrote to for over a week leaves them."""
    for path in store.uploads.glob(f"{upload_id}*"):
        os.utime(path, (WEEK_AGO, WEEK_AGO))


def test_abandoned_sessions_are_pruned_periodically_without_new_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.time", clock := ManualClock())
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.PRUNE_TICK", 0.01, raising=False)
    store = OciStore(tmp_path / "oci")
    try:
        old, kept = store.start_upload("w", 10), store.start_upload("w", 10)
        _age(store, old)
        assert store.upload_size(old) == 0
        clock.now += PRUNE_SECONDS  # an hour later, and no session starts
        wait_until(lambda: not list(store.uploads.glob(f"{old}*")), 60,
                   "an abandoned session was kept: no new session started")  # fmt: skip
        assert store.upload_size(kept) == 0
    finally:
        store.close()


def _auth(env: RegistryEnv, token: str = "writer") -> dict[str, str]:
    return {"Authorization": f"Bearer {env.tokens[token]}"}


def _session_response(env: RegistryEnv, server: RegistryServer,
                      token: str = "writer") -> urllib3.BaseHTTPResponse:  # fmt: skip
    return HTTP.request("POST", f"{server.url}/v2/grp/model/blobs/uploads/",
                        headers=_auth(env, token))  # fmt: skip


def _session(env: RegistryEnv, server: RegistryServer, token: str = "writer") -> str:
    start = _session_response(env, server, token)
    assert start.status == 202, start.data
    return server.url + start.headers["Location"]


def _patch(env: RegistryEnv, url: str, body: bytes, start: int = 0,
           token: str = "writer", chunked: bool = False) -> urllib3.BaseHTTPResponse:  # fmt: skip
    headers = {**_auth(env, token), "Content-Range": f"{start}-{start + len(body) - 1}"}
    data: Any = iter([body[:1000], body[1000:]]) if chunked else body
    return HTTP.request("PATCH", url, body=data, headers=headers, chunked=chunked)


def test_bytes_all_open_sessions_hold_are_bounded_before_writing(
    registry_env: RegistryEnv,
) -> None:
    """Tokens x max_upload_sessions x max_upload_bytes was the only bound on what unfinished
    uploads held (the disk filling, 507, was the backstop). Past ``max_session_bytes``, all
    tokens' sessions together, a body is refused 507 before it is written."""
    registry_env.set_config(max_session_bytes=10_000, max_upload_bytes=8_000)
    server = registry_env.start()
    first = _session(registry_env, server)
    assert _patch(registry_env, first, b"a" * 6000).status == 202
    other = _session(registry_env, server, "all")  # another token: the bound is service-wide
    refused = _patch(registry_env, other, b"b" * 5000, token="all")
    assert refused.status == 507, refused.data
    error = json.loads(refused.data)["errors"][0]
    assert error["code"] == "DENIED" and "max_session_bytes" in error["message"]
    held = [p for p in (registry_env.data / "oci" / "uploads").iterdir() if "." not in p.name]
    assert sorted(p.stat().st_size for p in held) == [0, 6000]  # nothing of it was written
    chunked = _patch(registry_env, other, b"c" * 5000, token="all", chunked=True)
    assert chunked.status == 507, chunked.data  # no length declared: refused as it passes
    resumable = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/big",
                             headers=_auth(registry_env))  # fmt: skip
    location = server.url + resumable.headers["Location"]
    piece = HTTP.request("PATCH", location, body=b"d" * 5000,
                         headers={**_auth(registry_env), "Content-Range": "0-4999"})  # fmt: skip
    assert piece.status == 507 and "max_session_bytes" in json.loads(piece.data)["error"]
    metrics = get(server, "/metrics").data.decode()
    assert 'cvmfs_registry_errors_total{kind="session_bytes"} 3.0' in metrics
    assert HTTP.request("DELETE", first, headers=_auth(registry_env)).status == 204
    offset = int(get(server, location.removeprefix(server.url), registry_env.tokens["writer"]
                     ).headers["Upload-Offset"])  # fmt: skip
    sent = HTTP.request("PATCH", location, body=b"d" * 5000, headers={
        **_auth(registry_env), "Content-Range": f"{offset}-{offset + 4999}"})  # fmt: skip
    assert sent.status == 202, sent.data  # the cancelled session's bytes were given back
    server.terminate()  # counted from the disk after a restart
    server = registry_env.start()
    again = _session(registry_env, server)
    assert _patch(registry_env, again, b"e" * 6000).status == 507


def test_a_session_without_an_owner_is_owned_by_the_token_that_writes_to_it(
    registry_env: RegistryEnv,
) -> None:
    """Sessions opened before owners were kept have no owner file: they counted against
    nobody, however long their token went on using them. The token that writes to one now
    owns it (it counts toward its ``max_upload_sessions``); its bytes count from startup."""
    registry_env.set_config(max_upload_sessions=2, max_session_bytes=10_000)
    server = registry_env.start()
    old = _session(registry_env, server)
    assert _patch(registry_env, old, b"a" * 3000).status == 202
    server.terminate()
    uploads = registry_env.data / "oci" / "uploads"
    (owner,) = uploads.glob("*.owner")
    owner.unlink()  # as a registry from before the owner files left it
    old = old.replace(server.url, (server := registry_env.start()).url)  # another port
    first = _session(registry_env, server, "all")
    assert _patch(registry_env, first, b"b" * 8000).status == 507  # 3000 held without owner
    assert _patch(registry_env, old, b"c" * 1000, start=3000).status == 202
    assert owner.read_text() == "writer"  # adopted by the token that went on with it
    _session(registry_env, server)  # its second
    refused = _session_response(registry_env, server)
    assert refused.status == 429, "a session its token wrote to did not count for it"
    server.terminate()
    server = registry_env.start()  # the adoption outlives a restart
    assert _session_response(registry_env, server).status == 429


def test_a_session_without_an_owner_nobody_writes_to_is_pruned_as_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvmfs_ml.registry.oci_store.time", clock := ManualClock())
    store = OciStore(tmp_path / "oci")
    orphan = store.start_upload("w", 10)
    store.close()
    (store.uploads / f"{orphan}.owner").unlink()
    store = OciStore(tmp_path / "oci")  # a restart: the session is known by its file alone
    try:
        _age(store, orphan)
        clock.now += PRUNE_SECONDS
        store.start_upload("w", 10)
        assert not list(store.uploads.glob(f"{orphan}*"))
        assert store.ledger.total == 0
    finally:
        store.close()


def test_bytes_waiting_in_the_queue_are_bounded_before_writing(
    registry_env: RegistryEnv,
) -> None:
    """Accepted user-pub bodies wait in the spool until published, and any number of them,
    from any token, were taken: a slow or stuck publisher let the queue fill the disk. Past
    ``max_queued_bytes`` a body is refused 507 (before it is written when its length is
    declared), in each API's form; once the queue drains, it is taken."""
    first, second, third = (make_tarball({f"{n}.bin": os.urandom(3000)}, gz=False)
                            for n in "abc")  # fmt: skip
    registry_env.set_config(max_queued_bytes=len(first) + len(second) + 100)
    server = registry_env.start()
    token = registry_env.tokens["writer"]
    with ExitStack() as stack:  # the workers wait for the repositories: jobs stay queued
        for fqrn in FQRNS:
            stack.enter_context(registry_env.publisher(fqrn).lock())
        assert text(post(server, "/pubapi/publish?cid=grp/a", first, token)) == "OK\n"
        assert text(post(server, "/pubapi/publish?cid=grp/b", second, token)) == "OK\n"
        refused = post(server, "/pubapi/publish?cid=grp/c", third, token)
        assert refused.status == 507, text(refused)
        assert text(refused).startswith("Server error: ") and "max_queued_bytes" in text(refused)
        api = post(server, "/api/v1/cids/grp/c", third, token)
        assert api.status == 507 and "max_queued_bytes" in json.loads(api.data)["error"]
        session = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid=grp/c",
                               headers=_auth(registry_env))  # fmt: skip
        location = server.url + session.headers["Location"]
        piece = HTTP.request("PATCH", location, body=third, headers={
            **_auth(registry_env), "Content-Range": f"0-{len(third) - 1}"})  # fmt: skip
        assert piece.status == 202, piece.data
        put = HTTP.request("PUT", location, headers=_auth(registry_env))
        assert put.status == 507 and "max_queued_bytes" in json.loads(put.data)["error"]
        kept = HTTP.request("GET", location, headers=_auth(registry_env))
        assert json.loads(kept.data)["offset"] == len(third)  # the session is kept
        spooled = list((registry_env.data / "spool").iterdir())
        assert len(spooled) == 2, spooled  # nothing of the refused ones was kept
    exists = "/pubapi/exists?cid=grp/b"
    wait_until(lambda: text(get(server, exists)).startswith("PRESENT"), 120, server.logs)
    wait_until(lambda: text(get(server, "/pubapi/exists?cid=grp/a")).startswith("PRESENT"), 120)
    put = HTTP.request("PUT", location, headers=_auth(
        registry_env))  # fmt: skip
    assert put.status == 202, put.data  # the kept session, once the queue drained
    metrics = get(server, "/metrics").data.decode()
    assert 'cvmfs_registry_errors_total{kind="queued_bytes"} 3.0' in metrics
