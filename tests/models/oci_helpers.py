"""Helpers of the OCI ingest tests (test_oci*.py, test_oci_hostile_sizes.py and
tests/sync/test_sync_models*.py): pushing blobs, manifests, ModelPack artifacts to the registry
through the distribution API, building tar layers, reading a published model back, and a
Bearer-token front for the registry.

The ``publisher`` fixture these helpers are used with is in ``conftest.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import random
from typing import Any

import urllib3
import zstandard

from cvmfs_ml.client.repository import Repository
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import (
    ANNOTATION_FILE_METADATA,
    ANNOTATION_FILEPATH,
    ANNOTATION_TITLE,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
)
from cvmfs_ml.models.sources.oci_client import OCI_MANIFEST
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.repository import Publisher
from quiet_http import QuietHTTPServer
from sync.imagebuild import make_layer as make_tar  # one tar builder for layers and models

HTTP = urllib3.PoolManager()


# -- helpers: pushing to the registry, building layers, reading the repository back ----------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> str:
    return f"sha256:{sha256(data)}"


def push_blob(base: str, repo: str, data: bytes) -> dict[str, Any]:
    """Monolithic upload (POST then PUT ?digest=); returns the descriptor (no media type)."""
    start = HTTP.request("POST", f"{base}/v2/{repo}/blobs/uploads/")
    assert start.status == 202, start.data
    location = start.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    done = HTTP.request(
        "PUT",
        f"{location}{sep}digest={digest(data)}",
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status == 201, done.data
    return {"digest": digest(data), "size": len(data)}


def push_manifest(base: str, repo: str, tag: str, manifest: dict[str, Any]) -> str:
    body = json.dumps(manifest).encode()
    response = HTTP.request(
        "PUT",
        f"{base}/v2/{repo}/manifests/{tag}",
        body=body,
        headers={"Content-Type": manifest["mediaType"]},
    )
    assert response.status == 201, response.data
    assert response.headers["Docker-Content-Digest"] == digest(body)
    return digest(body)


def registry_digest(base: str, repo: str, tag: str, accept: str = OCI_MANIFEST) -> str:
    response = HTTP.request("HEAD", f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    assert response.status == 200
    return response.headers["Docker-Content-Digest"]


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def published(publisher: Publisher) -> Repository:
    """The published repository, read with one cache per repository (creating and deleting a
    fresh 256-folder cache per read costs about a second on slow file systems)."""
    cache = publisher.repo_dir.parent / "read-cache"
    return Repository.open(
        publisher.repo_dir, public_key=publisher.keys.paths.master_public, cache=cache
    )


def read_back(publisher: Publisher, path: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the model's files under ``path`` in the published repo
    (``model.json`` and the nested-catalog marker left out)."""
    out = {}
    with published(publisher) as repo:
        for entry in repo.walk(path):
            skip = (f"{path}/model.json", f"{path}/.cvmfscatalog")
            if entry.is_regular and entry.path not in skip:
                rel = entry.path[len(path) + 1 :]
                out[rel] = sha256(repo.read_bytes(entry.path))
    return out


def record_of(publisher: Publisher, ref: str) -> Any:
    with published(publisher) as repo:
        return read_record(repo, ModelRef.parse(ref))


def repo_state(publisher: Publisher) -> tuple[int, int]:
    """(revision, number of stored objects): both must stay put when nothing is published."""
    objects = sum(len(files) for _, _, files in os.walk(publisher.repo_dir / "data"))
    return publisher.manifest().revision, objects


# -- ModelPack: raw, tar, tar+gzip and tar+zstd layers ---------------------------------------------
def push_modelpack(base: str, repo: str, tag: str) -> tuple[str, dict[str, bytes]]:
    weights = random.Random(2).randbytes(300_000)
    config_json = b'{"architectures": ["Tiny"]}\n'
    readme = b"# tiny\n" * 100
    code = b"print('infer')\n"
    layers = [
        (
            "application/vnd.cncf.model.weight.v1.raw",
            weights,
            {
                ANNOTATION_FILEPATH: "weights/model.safetensors",
                ANNOTATION_TITLE: "model.safetensors",
                ANNOTATION_FILE_METADATA: json.dumps(
                    {"name": "model.safetensors", "mode": 0o640, "mtime": "2025-01-02T03:04:05Z"}
                ),
            },
        ),
        (
            "application/vnd.cncf.model.weight.config.v1.tar",
            make_tar([("config.json", config_json)]),
            {ANNOTATION_FILEPATH: "config.json"},
        ),
        (
            "application/vnd.cncf.model.doc.v1.tar+zstd",
            zst(make_tar([("docs", None), ("docs/README.md", readme)])),
            {ANNOTATION_FILEPATH: "docs"},
        ),
        (
            "application/vnd.cncf.model.code.v1.tar+gzip",
            gz(make_tar([("src/infer.py", code)])),
            {ANNOTATION_FILEPATH: "src/infer.py"},
        ),
    ]
    descriptors = []
    for media_type, blob, notes in layers:
        descriptor = push_blob(base, repo, blob)
        descriptors.append({"mediaType": media_type, **descriptor, "annotations": notes})
    config = {
        "descriptor": {
            "name": "tiny",
            "version": "1.0",
            "description": "a tiny ModelPack model",
            "licenses": ["Apache-2.0"],
        },
        "config": {"format": "safetensors", "paramSize": "75K"},
        "modelfs": {"type": "layers", "diffIds": [d["digest"] for d in descriptors]},
    }
    config_blob = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODELPACK_ARTIFACT,
        "config": {"mediaType": MODELPACK_CONFIG, **push_blob(base, repo, config_blob)},
        "layers": descriptors,
        "annotations": {"org.opencontainers.image.title": "tiny"},
    }
    expected = {
        "weights/model.safetensors": weights,
        "config.json": config_json,
        "docs/README.md": readme,
        "src/infer.py": code,
    }
    return push_manifest(base, repo, tag, manifest), expected


# -- token auth: a Bearer-challenging front in front of the real registry --------------------------
class TokenFront(QuietHTTPServer):
    """Answers ``/token`` for user ``alice``/``secret`` and forwards ``/v2/`` GETs with a token."""

    token = "t0ken-for-tests"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.token_requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _TokenHandler)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    server: TokenFront

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        import base64

        if self.path.startswith("/token"):
            self.server.token_requests.append(self.path)
            expected = "Basic " + base64.b64encode(b"alice:secret").decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"token": self.server.token}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_response(401)
            realm = f"http://{self.server.host}/token"
            self.send_header(
                "WWW-Authenticate", f'Bearer realm="{realm}",service="test",scope="x:y:pull"'
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = HTTP.request(
            "GET", self.server.upstream + self.path,
            headers={"Accept": self.headers.get("Accept", "*/*")}, redirect=True,
        )  # fmt: skip
        self.send_response(upstream.status)
        for name in ("Content-Type", "Docker-Content-Digest"):
            if name in upstream.headers:
                self.send_header(name, upstream.headers[name])
        self.send_header("Content-Length", str(len(upstream.data)))
        self.end_headers()
        self.wfile.write(upstream.data)
