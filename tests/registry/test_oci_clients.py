"""More of what real clients do against ``/v2/``: a KitOps ModelKit push becomes a model
version; oras-py lists tags page by page (following ``Link``) and deletes a tag; upload
sessions count against the per-token rate limit."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cvmfs_ml.cli import app

from ._helpers import FQRNS, HTTP, RegistryEnv, RegistryServer
from .test_oci_push import _auth, _oras, _published


def test_kitops_push_is_published_as_a_model(
    registry_env: RegistryEnv, registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvmfs_ml.models.sources.oci import KITOPS_CONFIG
    from cvmfs_ml.models.sources.oci_client import OCI_MANIFEST
    from models import oci_helpers

    class Authorised:  # the models tests' push helpers, with the token added
        def request(self, method: str, url: str, **kw: Any) -> Any:
            kw["headers"] = {**(kw.get("headers") or {}), **_auth(registry_env.tokens["all"])}
            return HTTP.request(method, url, **kw)

    monkeypatch.setattr(oci_helpers, "HTTP", Authorised())
    base, repo = registry.url, "ml/kit"
    model = random.Random(3).randbytes(50_000)
    kitfile = {"manifestVersion": "1.0",
               "package": {"name": "kit", "description": "a ModelKit", "authors": ["me"]},
               "model": {"name": "kit", "path": "model/model.gguf", "license": "MIT"}}  # fmt: skip
    layers = [
        ("application/vnd.kitops.modelkit.model.v1.tar+gzip",
         oci_helpers.gz(oci_helpers.make_tar([("model", None), ("model/model.gguf", model)]))),
        ("application/vnd.kitops.modelkit.docs.v1.tar",
         oci_helpers.make_tar([("README.md", b"hi\n")])),
    ]  # fmt: skip
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": KITOPS_CONFIG,
                   **oci_helpers.push_blob(base, repo, json.dumps(kitfile).encode())},
        "layers": [{"mediaType": mt, **oci_helpers.push_blob(base, repo, blob)}
                   for mt, blob in layers],
    }  # fmt: skip
    digest = oci_helpers.push_manifest(base, repo, "v1", manifest)
    state = _published(registry, repo, "v1")
    assert state["model"] == "ml/kit:v1" and state["digest"] == digest
    assert registry_env.read(FQRNS[0], "/ml/kit/v1/model/model.gguf") == model
    assert registry_env.read(FQRNS[0], "/ml/kit/v1/README.md") == b"hi\n"
    info = CliRunner().invoke(
        app, ["model", "info", str(registry_env.root / FQRNS[0]), "ml/kit:v1", "--json"]
    )
    record = json.loads(info.stdout)
    assert record["source"]["kind"] == "kitops" and record["license"] == "MIT"


def test_oras_lists_tags_page_by_page_and_deletes_one(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    host = f"127.0.0.1:{registry.port}"
    # Three components: a plain artifact store, not published as a model version.
    target = f"{host}/grp/docs/notes"
    writer = _oras(registry, "writer", registry_env.tokens["writer"])
    for tag in ("c", "a", "e", "b", "d"):
        Path("notes.txt").write_bytes(os.urandom(1000))  # a manifest of its own per tag
        assert writer.push(target=f"{target}:{tag}", files=["notes.txt"]).status_code == 201
    assert writer.get_tags(target) == ["a", "b", "c", "d", "e"]
    assert writer.get_tags(target, N=2) == ["a", "b"]  # one page of 2
    listed = HTTP.request("GET", f"{registry.url}/v2/grp/docs/notes/tags/list?n=2")
    assert listed.headers["Link"] == '</v2/grp/docs/notes/tags/list?n=2&last=b>; rel="next"'
    # oras delete_tag (it deletes the tag's manifest by digest) needs the admin scope.
    admin = _oras(registry, "admin", registry_env.tokens["admin"])
    assert admin.delete_tag(target, "c") is True
    assert admin.get_tags(target) == ["a", "b", "d", "e"]


def test_oci_upload_sessions_are_rate_limited(registry_env: RegistryEnv) -> None:
    registry_env.set_config(uploads_per_minute=2)
    server = registry_env.start()
    url = f"{server.url}/v2/grp/limited/blobs/uploads/"
    writer = _auth(registry_env.tokens["writer"])
    assert [HTTP.request("POST", url, headers=writer).status for _ in range(2)] == [202, 202]
    limited = HTTP.request("POST", url, headers=writer)
    assert limited.status == 429
    assert json.loads(limited.data)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert HTTP.request("POST", url, headers=_auth(registry_env.tokens["all"])).status == 202


def test_a_clean_push_counts_no_errors(
    registry_env: RegistryEnv, registry: RegistryServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An ordinary ``oras push`` asks first, without its token (the 401 challenge), and HEADs
    each blob to learn it is not there yet (404): cvmfs_registry_errors_total counted three
    errors for a push that went right, so an alert on it fired on every push."""
    monkeypatch.chdir(tmp_path)
    Path("weights.bin").write_bytes(os.urandom(50_000))
    client = _oras(registry, token=registry_env.tokens["writer"])
    pushed = client.push(target=f"127.0.0.1:{registry.port}/grp/clean:v1", files=["weights.bin"])
    assert pushed.status_code == 201
    _published(registry, "grp/clean", "v1")
    metrics = HTTP.request("GET", f"{registry.url}/metrics").data.decode()
    assert "cvmfs_registry_errors_total{" not in metrics, metrics
    # What did go wrong still counts: a token the registry does not know, a broken manifest.
    bogus = {"Authorization": "Bearer cvr_unknown"}
    assert HTTP.request("GET", f"{registry.url}/v2/grp/clean/tags/list", headers=bogus).status \
        == 401  # fmt: skip
    broken = HTTP.request("PUT", f"{registry.url}/v2/grp/clean/manifests/v2", body=b"[",
                          headers=_auth(registry_env.tokens["writer"]))  # fmt: skip
    assert broken.status == 400
    metrics = HTTP.request("GET", f"{registry.url}/metrics").data.decode()
    assert 'cvmfs_registry_errors_total{kind="auth"} 1.0' in metrics
    assert 'cvmfs_registry_errors_total{kind="oci"} 1.0' in metrics
