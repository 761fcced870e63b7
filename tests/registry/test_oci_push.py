"""``oras push`` to the registry lands a model version; the distribution API speaks the spec."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import oras.client
import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app

from ._helpers import FQRNS, HTTP, RegistryEnv, RegistryServer, get, start_body, wait_until


def _oras(server: RegistryServer, user: str | None = None, token: str | None = None) -> Any:
    client = oras.client.OrasClient(hostname=f"127.0.0.1:{server.port}", insecure=True)
    if token is not None:  # `oras login`: credentials into a docker config, then the token flow
        config = server.workdir / f"docker-config-{user or 'ci'}.json"
        client.login(user or "ci", token, hostname=f"127.0.0.1:{server.port}",
                     config_path=str(config))  # fmt: skip
    return client


def _published(server: RegistryServer, name: str, tag: str) -> dict[str, Any]:
    def state() -> dict[str, Any] | None:
        response = get(server, f"/api/v1/oci/{name}/{tag}")
        if response.status != 200:
            return None
        data = json.loads(response.data)
        assert data["state"] not in ("failed", "skipped"), data
        return data if data["state"] == "published" else None

    return wait_until(state, 180, server.logs)


@pytest.mark.parametrize("chunked", [False, True])
def test_oras_push_lands_a_model_version(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path, chunked: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    weights = os.urandom(300 * 1024)
    Path("weights.bin").write_bytes(weights)
    Path("config.json").write_text('{"hidden": 8}\n')
    client = _oras(registry, token=registry_env.tokens["writer"])
    tag = "v2" if chunked else "v1"
    response = client.push(
        target=f"127.0.0.1:{registry.port}/grp/tiny:{tag}",
        files=["weights.bin", "config.json"], do_chunked=chunked, chunk_size=64 * 1024,
    )  # fmt: skip
    assert response.status_code == 201
    state = _published(registry, "grp/tiny", tag)
    assert state["model"] == f"grp/tiny:{tag}" and state["revision"] >= 1
    assert registry_env.read(FQRNS[0], f"/grp/tiny/{tag}/weights.bin") == weights
    assert registry_env.read(FQRNS[0], f"/grp/tiny/{tag}/config.json") == b'{"hidden": 8}\n'
    info = CliRunner().invoke(
        app, ["model", "info", str(registry_env.root / FQRNS[0]), f"grp/tiny:{tag}", "--json"]
    )
    assert info.exit_code == 0, info.output
    record = json.loads(info.stdout)
    files = {f["path"]: f for f in record["files"]}
    assert files["weights.bin"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["source"]["type"] == "oci" and record["source"]["tag"] == tag
    # And it pulls back byte-identical through the distribution API.
    out = tmp_path / "pulled"
    pulled = _oras(registry).pull(target=f"127.0.0.1:{registry.port}/grp/tiny:{tag}",
                                  outdir=str(out))  # fmt: skip
    assert sorted(Path(p).name for p in pulled) == ["config.json", "weights.bin"]
    assert (out / "weights.bin").read_bytes() == weights
    # The weights were stored while they uploaded; the publish reused them.
    assert "1 file(s) of localhost/grp/tiny:" + tag in registry.logs()


def test_push_needs_a_token_with_the_namespace(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    # Plain HTTP here: oras retries refused requests with long back-offs.
    base, name = registry.url, "grp/denied"
    blob = b"w" * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    upload = f"{base}/v2/{name}/blobs/uploads/?digest={digest}"
    anonymous = HTTP.request("POST", upload, body=blob)
    assert anonymous.status == 401
    assert 'scope="repository:grp/denied:pull,push"' in anonymous.headers["WWW-Authenticate"]
    assert json.loads(anonymous.data)["errors"][0]["code"] == "UNAUTHORIZED"
    for who in ("reader", "other"):
        refused = HTTP.request("POST", upload, body=blob,
                               headers=_auth(registry_env.tokens[who]))  # fmt: skip
        assert refused.status == 403, who
        assert json.loads(refused.data)["errors"][0]["code"] == "DENIED"
    revoked = registry_env.tokens["writer"]
    from cvmfs_ml.registry.config import revoke_token

    revoke_token(registry_env.config, "writer")
    assert HTTP.request("POST", upload, body=blob, headers=_auth(revoked)).status == 401
    assert HTTP.request("HEAD", f"{base}/v2/{name}/blobs/{digest}").status == 404  # no change
    # The token endpoint: the registry token as Basic password comes back as the bearer token.
    import base64

    good = registry_env.tokens["all"]
    basic = base64.b64encode(f"ci:{good}".encode()).decode()
    answer = HTTP.request("GET", f"{base}/token?service=cvmfs-ml-registry",
                          headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    assert answer.status == 200 and json.loads(answer.data)["token"] == good
    bad = base64.b64encode(b"ci:cvr_wrong").decode()
    assert (
        HTTP.request("GET", f"{base}/token", headers={"Authorization": f"Basic {bad}"}).status
        == 401
    )
    anonymous_token = json.loads(HTTP.request("GET", f"{base}/token").data)["token"]
    pull = HTTP.request("GET", f"{base}/v2/{name}/tags/list", headers=_auth(anonymous_token))
    assert pull.status == 200  # anonymous read is on by default...
    push = HTTP.request("POST", upload, body=blob, headers=_auth(anonymous_token))
    assert push.status == 401  # ...anonymous write never
    assert HTTP.request("GET", f"{base}/v2/").status == 401  # the probe always challenges
    assert registry_env.revision(FQRNS[0]) == 0


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_distribution_api_errors_and_details(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    base, auth = registry.url, _auth(registry_env.tokens["writer"])
    name = "grp/spec"

    def code(response: Any) -> str:
        return json.loads(response.data)["errors"][0]["code"]

    blob = os.urandom(5000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    wrong = HTTP.request("POST", f"{base}/v2/{name}/blobs/uploads/?digest=sha256:{'0' * 64}",
                         body=blob, headers=auth)  # fmt: skip
    assert wrong.status == 400 and code(wrong) == "DIGEST_INVALID"
    assert HTTP.request("HEAD", f"{base}/v2/{name}/blobs/{digest}").status == 404
    # Chunked: POST, PATCH x2 with Content-Range, a PATCH out of order (416), PUT ?digest=.
    start = HTTP.request("POST", f"{base}/v2/{name}/blobs/uploads/", headers=auth)
    assert start.status == 202 and start.headers["Location"].startswith(
        f"/v2/{name}/blobs/uploads/"
    )
    location = base + start.headers["Location"]
    first = HTTP.request("PATCH", location, body=blob[:3000],
                         headers={**auth, "Content-Range": "0-2999"})  # fmt: skip
    assert first.status == 202 and first.headers["Range"] == "0-2999"
    bad = HTTP.request("PATCH", location, body=blob[3000:],
                       headers={**auth, "Content-Range": "10-20"})  # fmt: skip
    assert bad.status == 416
    status = HTTP.request("GET", location, headers=auth)
    assert status.status == 204 and status.headers["Range"] == "0-2999"
    HTTP.request(
        "PATCH", location, body=blob[3000:], headers={**auth, "Content-Range": "3000-4999"}
    )
    done = HTTP.request("PUT", f"{location}?digest={digest}", headers=auth)
    assert done.status == 201 and done.headers["Docker-Content-Digest"] == digest
    fetched = HTTP.request("GET", f"{base}/v2/{name}/blobs/{digest}")
    assert fetched.status == 200 and fetched.data == blob
    # Cross-repository mount of a blob that is here: 201 without an upload.
    mounted = HTTP.request("POST", f"{base}/v2/grp/other/blobs/uploads/?mount={digest}&from={name}",
                           headers=auth)  # fmt: skip
    assert mounted.status == 201 and mounted.headers["Location"] == f"/v2/grp/other/blobs/{digest}"

    # Manifests: malformed, unknown blob, then a good one by tag, by digest, tags list, referrers.
    media = "application/vnd.oci.image.manifest.v1+json"
    put = lambda ref, body, ct=media: HTTP.request(  # noqa: E731
        "PUT", f"{base}/v2/{name}/manifests/{ref}", body=body, headers={**auth, "Content-Type": ct}
    )
    assert code(put("v1", b"{not json")) == "MANIFEST_INVALID"
    empty = b"{}"
    empty_digest = "sha256:" + hashlib.sha256(empty).hexdigest()
    HTTP.request("POST", f"{base}/v2/{name}/blobs/uploads/?digest={empty_digest}", body=empty,
                 headers=auth)  # fmt: skip
    manifest = {
        "schemaVersion": 2, "mediaType": media,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest,
                   "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": "sha256:" + "1" * 64,
                    "size": 3}],
    }  # fmt: skip
    unknown = put("v1", json.dumps(manifest).encode())
    assert unknown.status == 400 and code(unknown) == "MANIFEST_BLOB_UNKNOWN"
    # Structures that are not the spec's are refused with 400, not a server error (an index
    # whose manifests are a number, a config that is a string, a layer's size as text...).
    for broken in (
        {"schemaVersion": 2, "manifests": 5},
        {"schemaVersion": 2, "manifests": [{"digest": empty_digest, "size": 2, "platform": 1}]},
        {**manifest, "layers": [{**manifest["layers"][0], "size": "3"}]},
        {**manifest, "layers": [{**manifest["layers"][0], "annotations": {"a": 1}}]},
        {**manifest, "artifactType": {"x": 1}},
    ):
        answer = put("v1", json.dumps(broken).encode())
        assert answer.status == 400 and code(answer) == "MANIFEST_INVALID", broken
    deep = b'{"a":' * 20_000 + b"1" + b"}" * 20_000  # RecursionError in json.loads: was a 500
    assert code(put("v1", deep)) == "MANIFEST_INVALID"
    manifest["layers"] = [{"mediaType": "application/octet-stream", "digest": digest,
                           "size": len(blob), "annotations": {
                               "org.opencontainers.image.title": "blob.bin"}}]  # fmt: skip
    body = json.dumps(manifest).encode()
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    created = put("v1", body)
    assert created.status == 201 and created.headers["Docker-Content-Digest"] == manifest_digest
    assert code(put(f"sha256:{'2' * 64}", body)) == "DIGEST_INVALID"
    by_digest = HTTP.request("GET", f"{base}/v2/{name}/manifests/{manifest_digest}")
    assert by_digest.data == body and by_digest.headers["Content-Type"] == media
    tags = json.loads(HTTP.request("GET", f"{base}/v2/{name}/tags/list").data)
    assert tags == {"name": name, "tags": ["v1"]}
    signature = {
        "schemaVersion": 2, "mediaType": media, "artifactType": "application/example.sig",
        "config": manifest["config"], "layers": manifest["layers"],
        "subject": {"mediaType": media, "digest": manifest_digest, "size": len(body)},
    }  # fmt: skip
    referring = put("sig", json.dumps(signature).encode())
    assert referring.headers["OCI-Subject"] == manifest_digest
    index = json.loads(HTTP.request("GET", f"{base}/v2/{name}/referrers/{manifest_digest}").data)
    assert [m["artifactType"] for m in index["manifests"]] == ["application/example.sig"]
    # Manifest unknown; deletes need admin.
    missing = HTTP.request("GET", f"{base}/v2/{name}/manifests/nope")
    assert missing.status == 404 and code(missing) == "MANIFEST_UNKNOWN"
    denied = HTTP.request("DELETE", f"{base}/v2/{name}/manifests/v1", headers=auth)
    assert denied.status == 403 and code(denied) == "DENIED"
    admin = _auth(registry_env.tokens["admin"])
    assert HTTP.request("DELETE", f"{base}/v2/{name}/manifests/v1", headers=admin).status == 202
    assert HTTP.request("GET", f"{base}/v2/{name}/manifests/v1").status == 404


def test_modelpack_push_is_published_as_a_model(
    registry_env: RegistryEnv, registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ModelPack artifact the models tests push to docker-registry, pushed here with a token.
    from models import oci_helpers

    class Authorised:  # the same calls, each with the token added to its headers
        def request(self, method: str, url: str, **kw: Any) -> Any:
            kw["headers"] = {**(kw.get("headers") or {}), **_auth(registry_env.tokens["all"])}
            return HTTP.request(method, url, **kw)

    monkeypatch.setattr(oci_helpers, "HTTP", Authorised())
    manifest_digest, expected = oci_helpers.push_modelpack(registry.url, "cncf/tiny", "1.0")
    state = _published(registry, "cncf/tiny", "1.0")
    assert state["model"] == "cncf/tiny:1.0" and state["digest"] == manifest_digest
    for path, data in expected.items():
        assert registry_env.read(FQRNS[0], f"/cncf/tiny/1.0/{path}") == data
    info = CliRunner().invoke(
        app, ["model", "info", str(registry_env.root / FQRNS[0]), "cncf/tiny:1.0", "--json"]
    )
    record = json.loads(info.stdout)
    assert record["source"]["kind"] == "modelpack"
    assert record["source"]["manifest_digest"] == manifest_digest
    assert record["license"] == "Apache-2.0"


def test_oversized_blobs_and_manifests_are_refused(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    registry_env.set_config(max_upload_bytes=10_000)  # re-read by the running service
    base, auth = registry.url, _auth(registry_env.tokens["writer"])
    blob = os.urandom(20_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    monolithic = HTTP.request("POST", f"{base}/v2/grp/big/blobs/uploads/?digest={digest}",
                              body=blob, headers=auth)  # fmt: skip
    assert monolithic.status == 413
    assert json.loads(monolithic.data)["errors"][0]["code"] == "SIZE_INVALID"
    start = HTTP.request("POST", f"{base}/v2/grp/big/blobs/uploads/", headers=auth)
    location = base + start.headers["Location"]
    first = HTTP.request("PATCH", location, body=blob[:8000],
                         headers={**auth, "Content-Range": "0-7999"})  # fmt: skip
    assert first.status == 202
    second = HTTP.request("PATCH", location, body=blob[8000:],
                          headers={**auth, "Content-Range": f"8000-{len(blob) - 1}"})  # fmt: skip
    assert second.status == 413  # the session as a whole passed the bound
    assert HTTP.request("HEAD", f"{base}/v2/grp/big/blobs/{digest}").status == 404
    huge = b'{"schemaVersion": 2, "pad": "' + b"x" * (4 * 2**20 + 10) + b'"}'
    typed = {**auth, "Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    manifest = HTTP.request("PUT", f"{base}/v2/grp/big/manifests/v1", body=huge, headers=typed)
    assert manifest.status == 413
    assert HTTP.request("GET", f"{base}/v2/grp/big/manifests/v1").status == 404


def test_a_patch_cut_off_mid_body_keeps_what_arrived(
    registry_env: RegistryEnv, registry: RegistryServer
) -> None:
    """The server gathers an upload's body in blocks (``RECEIVE_BLOCK``) before writing it; a
    client that goes away mid-body still finds every byte that arrived in the session, and
    resumes from there, as when each piece was written as it came. The server logs one line
    for it (each such request, and each manifest PUT cut off, logged a 60-line traceback)."""
    from cvmfs_ml.registry.oci_api import RECEIVE_BLOCK

    base, auth = registry.url, _auth(registry_env.tokens["writer"])
    name = "grp/cut"
    blob = os.urandom(RECEIVE_BLOCK + RECEIVE_BLOCK // 2 + 12345)
    sent = RECEIVE_BLOCK + RECEIVE_BLOCK // 4  # one full block and part of the next
    start = HTTP.request("POST", f"{base}/v2/{name}/blobs/uploads/", headers=auth)
    location = base + start.headers["Location"]
    headers = {**auth, "Content-Range": f"0-{len(blob) - 1}"}
    with start_body(location, headers, len(blob)) as conn:
        conn.sendall(blob[:sent])
    # the server sees the disconnect after the bytes that came before it, and is done with it
    wait_until(lambda: "went away" in registry.logs() or "Traceback" in registry.logs(), 60,
               registry.logs)  # fmt: skip
    assert "Traceback" not in registry.logs()
    assert HTTP.request("GET", location, headers=auth).headers.get("Range") == f"0-{sent - 1}"
    rest = HTTP.request("PATCH", location, body=blob[sent:],
                        headers={**auth, "Content-Range": f"{sent}-{len(blob) - 1}"})  # fmt: skip
    assert rest.status == 202, rest.data
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    done = HTTP.request("PUT", f"{location}?digest={digest}", headers=auth)
    assert done.status == 201, done.data
    assert HTTP.request("GET", f"{base}/v2/{name}/blobs/{digest}").data == blob
    with start_body(f"{base}/v2/{name}/manifests/v1", auth, 10_000, "PUT") as conn:
        conn.sendall(b'{"schemaVersion": 2')
    wait_until(lambda: registry.logs().count("went away") == 2 or "Traceback" in registry.logs(),
               60, registry.logs)  # fmt: skip
    assert "Traceback" not in registry.logs()
