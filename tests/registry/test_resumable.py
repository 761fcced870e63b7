"""Resumable CID uploads: pieces with Content-Range, 416 on a gap, resume after a restart."""

from __future__ import annotations

import hashlib
import json
import os

from ._helpers import FQRNS, HTTP, RegistryEnv, get, job_json, make_tarball, wait_until


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
    queued = HTTP.request("PUT", location, headers=auth)
    assert queued.status == 202, queued.data
    job = json.loads(queued.data)
    done = wait_until(
        lambda: (d := job_json(server, job["id"]))["state"] == "published" and d, 120, server.logs
    )
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
