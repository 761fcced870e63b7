"""Hostile manifest pushes: each is answered 400 in the distribution API's error form and
leaves the registry serving everyone else (a bad manifest once left the store's database inside
a transaction, refusing every later push until a restart; thousands of ``?tag=`` queued
thousands of publishes ahead of other users' and held a SIGTERM until all were done)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.registry.oci_api import ModelPublisher
from cvmfs_ml.registry.oci_store import OciStore

from ._helpers import HTTP, RegistryEnv, RegistryServer, get, start_body, wait_until

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _code(response: Any) -> str:
    return json.loads(response.data)["errors"][0]["code"]


class Pusher:
    """Blobs and manifests pushed to one repository of ``server`` with ``token``."""

    def __init__(self, server: RegistryServer, token: str, name: str) -> None:
        self.base = f"{server.url}/v2/{name}"
        self.auth = {"Authorization": f"Bearer {token}"}

    def blob(self, data: bytes, media: str = "application/octet-stream") -> dict[str, Any]:
        digest = _digest(data)
        answer = HTTP.request("POST", f"{self.base}/blobs/uploads/?digest={digest}", body=data,
                              headers=self.auth)  # fmt: skip
        assert answer.status == 201, answer.data
        return {"mediaType": media, "digest": digest, "size": len(data)}

    def model(self, weights: bytes) -> dict[str, Any]:
        """An ORAS-style model manifest over ``weights``, its blobs pushed."""
        config = self.blob(b"{}", "application/vnd.unknown.config.v1+json")
        layer = {**self.blob(weights),
                 "annotations": {"org.opencontainers.image.title": "weights.bin"}}  # fmt: skip
        return {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer]}

    def put(self, reference: str, document: Any, media: str | None = MANIFEST,
            query: str = "") -> Any:  # fmt: skip
        body = json.dumps(document).encode()
        headers = {**self.auth, **({"Content-Type": media} if media else {})}
        url = f"{self.base}/manifests/{reference}" + (f"?{query}" if query else "")
        return HTTP.request("PUT", url, body=body, headers=headers)


def test_bad_manifests_are_refused_and_later_pushes_still_land(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/bad")
    good = pusher.model(b"weights" * 100)
    layer = good["layers"][0]
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
    broken: list[tuple[dict[str, Any], str | None]] = [
        ({**good, "subject": {"digest": ["x"]}}, MANIFEST),  # was a 500 that wedged the store
        ({**good, "subject": {"digest": {"a": 1}}}, MANIFEST),
        ({**good, "subject": {"digest": 10**30}}, MANIFEST),
        ({**good, "subject": {"mediaType": 1}}, MANIFEST),
        ({**good, "subject": "sha256:" + "a" * 64}, MANIFEST),
        ({**good, "subject": {"mediaType": MANIFEST, "size": 3,  # else a header injection
                              "digest": "sha256:" + "a" * 64 + "\r\nX-Evil: 1"}}, MANIFEST),
        ({**index, "config": "abc"}, INDEX),
        ({**index, "config": {"mediaType": ["x"]}}, INDEX),
        ({**index, "layers": [1]}, INDEX),
        ({**index, "layers": "abc"}, INDEX),
        ({**good, "mediaType": ["x"]}, None),
        ({**good, "layers": [{**layer, "artifactType": 5}]}, MANIFEST),
        ({**good, "layers": [{**layer, "urls": "http://x"}]}, MANIFEST),
        ({**good, "config": {**good["config"], "size": True}}, MANIFEST),
    ]  # fmt: skip
    for number, (document, media) in enumerate(broken):
        answer = pusher.put(f"bad{number}", document, media)
        assert answer.status == 400, (document, answer.status, answer.data)
        assert _code(answer) == "MANIFEST_INVALID", document
        assert answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    # The same running server takes a legitimate push, and deletes (the other transaction).
    created = pusher.put("v1", good)
    assert created.status == 201, created.data
    digest = created.headers["Docker-Content-Digest"]
    assert HTTP.request("GET", f"{pusher.base}/manifests/v1").headers["Docker-Content-Digest"] \
        == digest  # fmt: skip
    signature = {**good, "subject": {"mediaType": MANIFEST, "digest": digest, "size": 10}}
    referring = pusher.put("sig", signature)
    assert referring.status == 201 and referring.headers["OCI-Subject"] == digest
    tags = json.loads(HTTP.request("GET", f"{pusher.base}/tags/list").data)["tags"]
    assert tags == ["sig", "v1"]  # none of the bad ones
    admin = {"Authorization": f"Bearer {registry_env.tokens['admin']}"}
    deleted = HTTP.request("DELETE", f"{pusher.base}/manifests/sig", headers=admin)
    assert deleted.status == 202
    assert pusher.put("v2", good).status == 201
    assert "Traceback" not in registry.logs()


def test_a_failed_statement_rolls_its_transaction_back(tmp_path: Path) -> None:
    """Whatever raises inside one of the store's transactions, the next one starts."""
    store = OciStore(tmp_path / "oci")
    try:
        with pytest.raises(sqlite3.ProgrammingError), store._transaction() as db:
            db.execute("INSERT INTO tags VALUES (?,?,?)", ("grp/x", "v0", "sha256:0"))
            db.execute("INSERT INTO tags VALUES (?,?,?)", ("grp/x", ["v1"], "sha256:1"))
        assert store.tags("grp/x") == []  # the first insert went with the failed one
        with store._transaction() as db:
            db.execute("INSERT INTO tags VALUES (?,?,?)", ("grp/x", "v2", "sha256:2"))
        assert store.tags("grp/x") == ["v2"]
    finally:
        store.close()


def test_too_many_tags_in_one_push_are_refused(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    registry_env.set_config(max_tags_per_push=3)  # re-read by the running service
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/many")
    document = pusher.model(b"w" * 1000)
    body = json.dumps(document).encode()
    query = "&".join(f"tag=t{i}" for i in range(3000))
    refused = pusher.put(_digest(body), document, query=query)
    assert refused.status == 400, refused.data
    error = json.loads(refused.data)["errors"][0]
    assert error["code"] == "TAG_INVALID"
    assert "3000 tags" in error["message"] and "max_tags_per_push" in error["message"]
    assert error["detail"] == {"limit": 3, "key": "max_tags_per_push"}
    # A tag in the path counts too: 3 query tags + the reference is one too many.
    assert pusher.put("t9", document, query="tag=t0&tag=t1&tag=t2").status == 400
    # Nothing was stored or queued.
    for tag in ("t0", "t2999", "t9"):
        assert get(registry, f"/api/v1/oci/grp/many/{tag}").status == 404
        assert HTTP.request("GET", f"{pusher.base}/manifests/{tag}").status == 404
    # At the limit (a repeated tag counts once) it is taken.
    created = pusher.put("t0", document, query="tag=t1&tag=t2&tag=t1")
    assert created.status == 201, created.data
    tags = json.loads(HTTP.request("GET", f"{pusher.base}/tags/list").data)["tags"]
    assert tags == ["t0", "t1", "t2"]


def test_sigterm_does_not_wait_for_queued_publishes(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    limit = 16  # the default max_tags_per_push
    names = [f"grp/queue{i}" for i in range(8)]
    for name in names:  # several users' pushes, each with as many tags as one push may carry
        pusher = Pusher(registry, registry_env.tokens["writer"], name)
        document = pusher.model(name.encode() * 50_000)
        tags = "&".join(f"tag=v{i}" for i in range(1, limit))
        assert pusher.put("v0", document, query=tags).status == 201

    def state(name: str, tag: str) -> str:
        return str(json.loads(get(registry, f"/api/v1/oci/{name}/{tag}").data)["state"])

    # The publishing thread is at work and the last push's tags are still queued behind it.
    wait_until(lambda: state(names[0], "v0") != "queued", 60, registry.logs)
    assert state(names[-1], f"v{limit - 1}") == "queued"
    process = registry.process
    assert process is not None
    started = time.monotonic()
    registry.terminate()
    # (the rows below tell whether it waited for the queue; the deadline is for the load)
    wait_until(lambda: process.poll() is not None, 60, registry.logs)
    stopped_after = time.monotonic() - started
    assert "Application shutdown complete" in registry.logs(), stopped_after
    # Nothing is left "queued" or "publishing": those not started say why, to push again.
    db = sqlite3.connect(registry_env.data / "oci" / "oci.sqlite")
    try:
        rows = db.execute("SELECT repo, tag, state, reason FROM publishes").fetchall()
    finally:
        db.close()
    assert len(rows) == len(names) * limit
    states = [row[2] for row in rows]
    assert set(states) <= {"published", "failed"}, rows
    cancelled = [row for row in rows if row[3] == ModelPublisher.STOPPED]
    assert cancelled and all(row[2] == "failed" for row in cancelled), rows
    assert (names[-1], f"v{limit - 1}", "failed", ModelPublisher.STOPPED) in rows
    assert states.count("failed") == len(cancelled), rows  # no publish failed otherwise
    assert "queued publish(es) of pushed tags cancelled" in registry.logs()


def test_a_second_request_on_an_upload_being_written_is_refused(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """Two PATCHes on one session at once both wrote from the offset each found, into one
    running hash: the file kept one's bytes, the hash saw both, and a PUT with that hash
    stored a blob under a digest its bytes do not have. The second now answers 416, and
    leaves the first's pre-ingest alone (the publish takes the objects stored meanwhile)."""
    from cvmfs_ml.registry.oci_api import RECEIVE_BLOCK

    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/race")
    first = b"weights" + os.urandom(RECEIVE_BLOCK + 4096)  # not a gzip or tar header: fed
    rest, other = os.urandom(2**20), os.urandom(2**19)
    start = HTTP.request("POST", f"{pusher.base}/blobs/uploads/", headers=pusher.auth)
    location = registry.url + start.headers["Location"]
    with start_body(location, pusher.auth, len(first) + len(rest)) as conn:
        conn.sendall(first)
        # its first block is on disk: the request is writing the session
        wait_until(lambda: HTTP.request("GET", location, headers=pusher.auth).headers["Range"]
                   == f"0-{RECEIVE_BLOCK - 1}", 60, registry.logs)  # fmt: skip
        meanwhile = HTTP.request("PATCH", location, body=other, headers=pusher.auth)
        assert meanwhile.status == 416, meanwhile.data
        conn.sendall(rest)
        reply = conn.makefile("rb").readline()
        assert reply.split()[1] == b"202", reply
    blob = first + rest
    status = HTTP.request("GET", location, headers=pusher.auth)
    assert status.headers["Range"] == f"0-{len(blob) - 1}"
    done = HTTP.request("PUT", f"{location}?digest={_digest(blob)}", headers=pusher.auth)
    assert done.status == 201, done.data
    stored = HTTP.request("GET", f"{pusher.base}/blobs/{_digest(blob)}", headers=pusher.auth)
    assert stored.data == blob
    layer = {"mediaType": "application/octet-stream", "digest": _digest(blob), "size": len(blob),
             "annotations": {"org.opencontainers.image.title": "weights.bin"}}  # fmt: skip
    config = pusher.blob(b"{}", "application/vnd.unknown.config.v1+json")
    document = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer]}
    assert pusher.put("v1", document).status == 201
    wait_until(lambda: json.loads(get(registry, "/api/v1/oci/grp/race/v1").data)["state"]
               == "published", 120, registry.logs)  # fmt: skip
    assert "1 file(s) of localhost/grp/race:v1@sha256:" in registry.logs()  # pre-ingested
    assert "Traceback" not in registry.logs()


def _metric(server: RegistryServer, line: str) -> float:
    """The value of the metric ``line`` starts with (0 when absent)."""
    for row in get(server, "/metrics").data.decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def test_the_same_push_again_publishes_nothing_and_counts_nothing(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """A push repeated (a retrying CI job) publishes no revision; the publishes counter
    ("revisions published") went up for it all the same."""
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/again")
    document = pusher.model(b"again" * 1000)
    publishes = 'cvmfs_registry_publishes_total{repository="pub1.test"}'

    def published() -> dict[str, Any] | None:
        state = json.loads(get(registry, "/api/v1/oci/grp/again/v1").data)
        assert state["state"] not in ("failed", "skipped"), state
        return state if state["state"] == "published" else None

    assert pusher.put("v1", document).status == 201
    first = wait_until(published, 120, registry.logs)
    assert _metric(registry, publishes) == 1
    assert pusher.put("v1", document).status == 201  # queued again, found already there
    again = wait_until(published, 120, registry.logs)
    assert again["revision"] == first["revision"] == registry_env.revision()
    assert _metric(registry, publishes) == 1


def test_a_monolithic_push_with_a_malformed_digest_is_refused_before_its_body(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """``POST .../blobs/uploads/?digest=md5:...`` took (and wrote) the whole body, up to
    max_upload_bytes, before answering 400 DIGEST_INVALID; the digest is read first now."""
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/mono")
    url = f"{pusher.base}/blobs/uploads/?digest=md5:0123"
    with start_body(url, pusher.auth, 10**9, "POST") as conn:
        reply = conn.makefile("rb").readline()
    assert reply.split()[1] == b"400", reply
    assert list((registry_env.data / "oci" / "uploads").iterdir()) == []


def test_a_manifest_without_a_media_type_or_of_the_wrong_shape_is_refused(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """A manifest with neither Content-Type nor ``mediaType`` was stored and served back with
    an empty ``Content-Type`` (no client can tell what it is); one sent as an index that is an
    image manifest (or the reverse) was stored under that type. docker-registry answers 400
    MANIFEST_INVALID to both."""
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/typeless")
    good = pusher.model(b"typeless" * 100)
    bare = {key: value for key, value in good.items() if key != "mediaType"}
    index = {"schemaVersion": 2, "manifests": []}
    for number, (document, media) in enumerate([(bare, None), (bare, INDEX), (index, MANIFEST)]):
        answer = pusher.put(f"bad{number}", document, media)
        assert answer.status == 400, (document, media, answer.data)
        assert _code(answer) == "MANIFEST_INVALID"
    assert HTTP.request("GET", f"{pusher.base}/tags/list").data.count(b"bad") == 0
    # Either one names the type.
    for number, (document, media) in enumerate([(bare, MANIFEST), (good, None), (index, INDEX)]):
        assert pusher.put(f"ok{number}", document, media).status == 201
        served = HTTP.request("GET", f"{pusher.base}/manifests/ok{number}")
        assert served.headers["Content-Type"] == (media or MANIFEST)


def test_an_artifact_without_layers_is_skipped_saying_why(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """A tagged artifact with no layers (a signature, an attestation pushed by tag) was handed
    to the models layer and recorded as failed with "/tmp/cvmfs-ml-oci.<random>/model holds
    no files to publish": a folder the user never had, gone by then."""
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/empty")
    document = {**pusher.model(b"x"), "layers": []}
    assert pusher.put("v1", document).status == 201

    def settled() -> dict[str, Any] | None:
        state = json.loads(get(registry, "/api/v1/oci/grp/empty/v1").data)
        return None if state["state"] in ("queued", "publishing") else state

    state = wait_until(settled, 60, registry.logs)
    assert state["state"] == "skipped", state
    assert "no layers" in state["reason"] and "/tmp" not in state["reason"], state


def test_a_publish_that_fails_unexpectedly_is_recorded_failed(registry_env: RegistryEnv) -> None:
    """A publish job that raises what nobody expected (a bug: a client given an argument it
    does not take failed every pushed image so) stayed 'publishing' for ever, without a line
    in the log: the executor kept the exception. It is failed, saying to report it, and logged."""
    from cvmfs_ml.registry.config import ConfigFile
    from cvmfs_ml.registry.service import RegistryService

    config = ConfigFile(registry_env.config)
    service = RegistryService(registry_env.repos, registry_env.data, config)
    store = OciStore(registry_env.data / "oci-unexpected")
    publisher = ModelPublisher(service, store)

    def broken(*args: Any) -> None:
        store.set_publish("grp/m", "1", "sha256:" + "0" * 64, "publishing", model="grp/m:1")
        raise TypeError("fetch_blob() got an unexpected keyword argument 'cancel'")

    try:
        publisher._queue("grp/m", "1", "sha256:" + "0" * 64, "grp/m:1", broken)
        state = wait_until(lambda: (s := store.publish_state("grp/m", "1")) is not None
                           and s["state"] != "publishing" and s["state"] != "queued" and s, 60)
        assert state["state"] == "failed" and state["reason"] == ModelPublisher.UNEXPECTED
    finally:
        publisher.close()


def test_a_pushed_model_is_held_to_max_tar_catalogs(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """Each layer titled ``<folder>/.cvmfscatalog`` made a nested catalog and no limit counted
    them; a pushed model is held to ``max_tar_catalogs`` as a tarball is."""
    registry_env.set_config(max_tar_catalogs=1)  # re-read by the running service
    pusher = Pusher(registry, registry_env.tokens["writer"], "grp/markers")
    title = "org.opencontainers.image.title"
    config = pusher.blob(b"{}", "application/vnd.unknown.config.v1+json")
    marker = pusher.blob(b"")
    layers = [{**pusher.blob(f"w{i}".encode()), "annotations": {title: f"m{i}/w.bin"}}
              for i in range(2)]  # fmt: skip
    layers += [{**marker, "annotations": {title: f"m{i}/.cvmfscatalog"}} for i in range(2)]
    document = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers}
    assert pusher.put("v1", document).status == 201

    def state() -> dict[str, Any]:
        return dict(json.loads(get(registry, "/api/v1/oci/grp/markers/v1").data))

    wait_until(lambda: state()["state"] in ("published", "failed"), 120, registry.logs)
    assert state()["state"] == "failed", state()
    assert "more than 1 .cvmfscatalog files" in str(state().get("reason")), state()
