"""Resumable CID uploads: pieces with Content-Range, 416 on a gap, resume after a restart."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ._helpers import (
    FQRNS,
    HTTP,
    RegistryEnv,
    RegistryServer,
    get,
    job_json,
    make_tarball,
    start_body,
    wait_until,
)  # fmt: skip


def _publish(server: RegistryServer, location: str, auth: dict[str, str]) -> dict[str, Any]:
    """PUT the session: its job, once published."""
    queued = HTTP.request("PUT", location, headers=auth)
    assert queued.status == 202, queued.data
    job = json.loads(queued.data)
    return wait_until(  # type: ignore[no-any-return]
        lambda: (d := job_json(server, job["id"]))["state"] == "published" and d, 120, server.logs
    )


def test_resumable_upload_survives_a_restart(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    auth = {"Authorization": f"Bearer {registry_env.tokens['writer']}"}
    payload = os.urandom(200_000)
    body = make_tarball({"big.bin": payload}, gz=False)
    cid = f"grp/sha256:{hashlib.sha256(body).hexdigest()}"
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid={cid}", headers=auth)
    assert created.status == 201, created.data
    location = server.url + json.loads(created.data)["location"]
    half = len(body) // 2
    first = HTTP.request("PATCH", location, body=body[:half],
                         headers={**auth, "Content-Range": f"0-{half - 1}"})  # fmt: skip
    assert first.status == 202 and json.loads(first.data)["offset"] == half
    skipped = {**auth, "Content-Range": f"{half + 10}-{len(body) - 1}"}
    gap = HTTP.request("PATCH", location, body=body[half + 10 :], headers=skipped)
    assert gap.status == 416 and json.loads(gap.data)["offset"] == half
    # Another token may not touch the session.
    other = {"Authorization": f"Bearer {registry_env.tokens['other']}"}
    assert HTTP.request("GET", location, headers=other).status == 403

    server.stop()  # the connection broke, the service restarted
    server = registry_env.start()
    location = server.url + location.split(str(registry_env.servers[0].port), 1)[1]
    resumed = HTTP.request("GET", location, headers=auth)
    assert json.loads(resumed.data)["offset"] == half
    rest = HTTP.request("PATCH", location, body=body[half:],
                        headers={**auth, "Content-Range": f"{half}-{len(body) - 1}"})  # fmt: skip
    assert json.loads(rest.data)["offset"] == len(body)
    done = _publish(server, location, auth)
    assert registry_env.read(done["repository"], f"/sw/{cid}/big.bin") == payload
    assert HTTP.request("GET", location, headers=auth).status == 404  # the session is gone
    assert done["repository"] in FQRNS


def test_resumable_upload_with_the_wrong_bytes_is_refused(registry_env: RegistryEnv) -> None:
    server = registry_env.start()
    auth = {"Authorization": f"Bearer {registry_env.tokens['writer']}"}
    body = make_tarball({"a": b"a"})
    cid = f"grp/sha256:{'0' * 64}"
    created = json.loads(HTTP.request("POST", f"{server.url}/api/v1/uploads?cid={cid}",
                                      headers=auth).data)  # fmt: skip
    location = server.url + created["location"]
    HTTP.request("PATCH", location, body=body,
                 headers={**auth, "Content-Range": f"0-{len(body) - 1}"})  # fmt: skip
    refused = HTTP.request("PUT", location, headers=auth)
    assert refused.status == 400 and "sha256" in json.loads(refused.data)["error"]
    assert json.loads(get(server, f"/api/v1/cids/{cid}").data)["state"] == "missing"
    assert list((registry_env.data / "spool").glob("*")) == []
    assert [registry_env.revision(f) for f in FQRNS] == [0, 0]


def test_a_piece_or_publish_while_a_piece_is_written_is_refused(
    registry_env: RegistryEnv,
) -> None:
    """A second PATCH, or the PUT, while a piece is still arriving answers 416: both wrote
    into the one session (and its running hash) at once, so what was published was not the
    bytes the hash described."""
    server = registry_env.start()
    auth = {"Authorization": f"Bearer {registry_env.tokens['writer']}"}
    payload = os.urandom(5 * 2**20)
    body = make_tarball({"big.bin": payload}, gz=False)
    cid = f"grp/sha256:{hashlib.sha256(body).hexdigest()}"
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid={cid}", headers=auth)
    location = server.url + json.loads(created.data)["location"]
    cut = 4 * 2**20 + 4096

    def offset() -> int:
        return int(json.loads(HTTP.request("GET", location, headers=auth).data)["offset"])

    with start_body(location, {**auth, "Content-Range": f"0-{len(body) - 1}"}, len(body)) as conn:
        conn.sendall(body[:cut])
        wait_until(lambda: offset() == 4 * 2**20, 60, server.logs)  # its first block is written
        other = {**auth, "Content-Range": f"{4 * 2**20}-{len(body) - 1}"}
        meanwhile = HTTP.request("PATCH", location, body=body[4 * 2**20 :], headers=other)
        assert meanwhile.status == 416, meanwhile.data
        early = HTTP.request("PUT", location, headers=auth)
        assert early.status == 416 and "error" in json.loads(early.data), early.data
        conn.sendall(body[cut:])
        reply = conn.makefile("rb").readline()
        assert reply.split()[1] == b"202", reply
    assert offset() == len(body)
    done = _publish(server, location, auth)
    assert registry_env.read(done["repository"], f"/sw/{cid}/big.bin") == payload


def test_a_bad_striplevels_keeps_the_session_and_is_refused_before_any_body(
    registry_env: RegistryEnv,
) -> None:
    """``PUT ...?striplevels=7`` on a complete resumable upload answered 400 and deleted the
    session: gigabytes sent over a flaky link were gone over a typo. user-pub's publish took
    the whole body before saying the same."""
    server = registry_env.start()
    auth = {"Authorization": f"Bearer {registry_env.tokens['writer']}"}
    payload = os.urandom(100_000)
    body = make_tarball({"big.bin": payload}, top="top", gz=False)
    cid = f"grp/sha256:{hashlib.sha256(body).hexdigest()}"
    created = HTTP.request("POST", f"{server.url}/api/v1/uploads?cid={cid}", headers=auth)
    location = server.url + json.loads(created.data)["location"]
    sent = HTTP.request("PATCH", location, body=body,
                        headers={**auth, "Content-Range": f"0-{len(body) - 1}"})  # fmt: skip
    assert sent.status == 202, sent.data
    for bad in ("7", "-1"):
        refused = HTTP.request("PUT", f"{location}?striplevels={bad}", headers=auth)
        assert refused.status == 400 and "striplevels" in json.loads(refused.data)["error"]
        assert json.loads(HTTP.request("GET", location, headers=auth).data)["offset"] == len(body)
    done = _publish(server, location + "?striplevels=1", auth)
    assert registry_env.read(done["repository"], f"/sw/{cid}/big.bin") == payload
    # user-pub's publish: refused as soon as the request line is read, the body never sent
    publish = f"{server.url}/pubapi/publish?cid=grp/x&striplevels=3"
    with start_body(publish, auth, 10**9, "POST") as conn:
        reply = conn.makefile("rb").readline()
    assert reply.split()[1] == b"400", reply
    assert list((registry_env.data / "spool").glob("*")) == []
