"""OCI ingest: ORAS artifacts, ModelPack, KitOps and container images from a real registry.

The registry is Debian's ``docker-registry`` (CNCF distribution 2.x) on loopback. ORAS artifacts
are pushed with the ``oras`` package, as users do; ModelPack, KitOps and image manifests are
built here and pushed through the distribution API (oras-py cannot set ``artifactType`` or push
image configs). Every test reads the published files back through
:class:`cvmfs_ml.client.repository.Repository` and compares SHA-256 with what was pushed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import random
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import urllib3
import zstandard
from typer.testing import CliRunner

from cvmfs_ml.cli.ingest import model_ingest
from cvmfs_ml.client.repository import Repository
from cvmfs_ml.cvmfs.objects import Compression
from cvmfs_ml.errors import DownloadError, FormatError, IntegrityError, UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import (
    ANNOTATION_FILE_METADATA,
    ANNOTATION_FILEPATH,
    ANNOTATION_TITLE,
    KITOPS_CONFIG,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    classify,
    ingest_oci,
    known_file_digests,
)
from cvmfs_ml.models.sources.oci_client import OCI_INDEX, OCI_MANIFEST, OciReference, RegistryClient
from cvmfs_ml.models.sources.unpack import TreeWriter, safe_relative
from cvmfs_ml.models.tree import read_record
from cvmfs_ml.publish.repository import Publisher, create_repository
from cvmfs_ml.publish.settings import PublishSettings
from quiet_http import QuietHTTPServer

HTTP = urllib3.PoolManager()


# -- helpers: a repository, pushing to the registry, building layers -------------------------------
@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    settings = PublishSettings(
        compression=Compression.ZLIB,
        min_chunk_size=64 * 1024,
        avg_chunk_size=128 * 1024,
        max_chunk_size=256 * 1024,
        workers=2,
    )
    return create_repository(tmp_path / "srv", "models.test", settings=settings)


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


def make_tar(entries: list[tuple[str, Any]], *, mtime: int = 1_700_000_000) -> bytes:
    """Tar of entries: ``(name, bytes)`` files, ``(name, None)`` dirs, ``(name, "->t")`` links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("=>"):
                info.type, info.linkname = tarfile.LNKTYPE, content[2:]
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


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


# -- ORAS artifacts pushed with the oras package ---------------------------------------------------
@pytest.mark.service
def test_oras_artifact_round_trip_and_idempotent(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oras.client

    work = tmp_path / "push"
    (work / "tokenizer" / "sub").mkdir(parents=True)
    weights = random.Random(1).randbytes(700_000)  # several chunks
    files = {
        "model.onnx": weights,
        "config.json": b'{"hidden": 4}\n',
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "tokenizer/sub/merges.txt": b"a b\n",
    }
    for rel, data in files.items():
        (work / rel).write_bytes(data)
    monkeypatch.chdir(work)  # oras-py wants paths below the working directory
    client = oras.client.OrasClient(insecure=True)
    client.push(
        target=f"{docker_registry.host}/ml/oras-model:v1",
        files=["model.onnx", "config.json:application/json", "tokenizer"],
    )
    manifest_digest = registry_digest(docker_registry.url, "ml/oras-model", "v1")

    result = ingest_oci(
        publisher, f"oci://{docker_registry.host}/ml/oras-model:v1", ModelRef.parse("hep/oras:1"),
        plain_http=True,
    )  # fmt: skip
    assert not result.skipped
    published = read_back(publisher, "/hep/oras/1")
    assert published == {rel: sha256(data) for rel, data in files.items()}
    record = record_of(publisher, "hep/oras:1")
    assert record.source["type"] == "oci"
    assert record.source["kind"] == "artifact"
    assert record.source["manifest_digest"] == manifest_digest
    assert record.source["reference"] == f"{docker_registry.host}/ml/oras-model:v1"
    assert {layer.get("title") for layer in record.source["layers"]} == {
        "model.onnx", "config.json", "tokenizer",
    }  # fmt: skip
    assert record.digests()["model.onnx"] == sha256(weights)

    # The same digest again: nothing downloaded, no revision, no object.
    before = repo_state(publisher)
    again = ingest_oci(
        publisher, f"{docker_registry.host}/ml/oras-model:v1", ModelRef.parse("hep/oras:1"),
        plain_http=True,
    )  # fmt: skip
    assert again.skipped
    assert "pull" not in again.seconds
    assert repo_state(publisher) == before

    # Pinned by digest, same thing.
    pinned = ingest_oci(
        publisher, f"{docker_registry.host}/ml/oras-model@{manifest_digest}",
        ModelRef.parse("hep/oras:1"), plain_http=True,
    )  # fmt: skip
    assert pinned.skipped and repo_state(publisher) == before


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


@pytest.mark.service
def test_modelpack_artifact(docker_registry: Any, publisher: Publisher) -> None:
    manifest_digest, expected = push_modelpack(docker_registry.url, "ml/tiny", "1.0")
    result = ingest_oci(
        publisher, f"oci://{docker_registry.host}/ml/tiny:1.0", ModelRef.parse("cncf/tiny:1.0"),
        plain_http=True,
    )  # fmt: skip
    files = read_back(publisher, "/cncf/tiny/1.0")
    assert files == {rel: sha256(data) for rel, data in expected.items()}
    record = record_of(publisher, "cncf/tiny:1.0")
    assert result.source["kind"] == record.source["kind"] == "modelpack"
    assert record.source["manifest_digest"] == manifest_digest
    assert record.source["artifact_type"] == MODELPACK_ARTIFACT
    assert record.source["config"]["config"]["format"] == "safetensors"
    assert record.description == "a tiny ModelPack model"
    assert record.license == "Apache-2.0"
    layers = {layer["mediaType"]: layer for layer in record.source["layers"]}
    assert layers["application/vnd.cncf.model.weight.v1.raw"]["path"] == (
        "weights/model.safetensors"
    )
    assert layers["application/vnd.cncf.model.doc.v1.tar+zstd"]["as"] == "unpacked"
    with published(publisher) as repo:
        entry = repo.stat("/cncf/tiny/1.0/weights/model.safetensors")
    assert entry.mtime == 1735787045  # from org.cncf.model.file.metadata+json


# -- KitOps ----------------------------------------------------------------------------------------
@pytest.mark.service
def test_kitops_modelkit(docker_registry: Any, publisher: Publisher) -> None:
    base, repo = docker_registry.url, "ml/kit"
    model = random.Random(3).randbytes(50_000)
    kitfile = {
        "manifestVersion": "1.0",
        "package": {"name": "kit", "description": "a ModelKit", "authors": ["me"]},
        "model": {"name": "kit", "path": "model/model.gguf", "license": "MIT"},
        "docs": [{"path": "README.md"}],
    }
    layers = [
        ("application/vnd.kitops.modelkit.model.v1.tar+gzip",
         gz(make_tar([("model", None), ("model/model.gguf", model)]))),
        ("application/vnd.kitops.modelkit.docs.v1.tar", make_tar([("README.md", b"hi\n")])),
    ]  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": KITOPS_CONFIG,
            **push_blob(base, repo, json.dumps(kitfile).encode()),
        },
        "layers": [{"mediaType": mt, **push_blob(base, repo, blob)} for mt, blob in layers],
    }
    manifest_digest = push_manifest(base, repo, "v1", manifest)
    ingest_oci(
        publisher, f"{docker_registry.host}/ml/kit:v1", ModelRef.parse("kit/kit:v1"),
        plain_http=True,
    )  # fmt: skip
    files = read_back(publisher, "/kit/kit/v1")
    assert files == {"model/model.gguf": sha256(model), "README.md": sha256(b"hi\n")}
    record = record_of(publisher, "kit/kit:v1")
    assert record.source["kind"] == "kitops"
    assert record.source["manifest_digest"] == manifest_digest
    assert record.description == "a ModelKit" and record.license == "MIT"

    # The CLI: the same reference again is a no-op; another version is published.
    app = typer.Typer()
    app.command()(model_ingest)
    args = [f"oci://{docker_registry.host}/ml/kit:v1", "--repo", str(publisher.repo_dir)]
    out = CliRunner().invoke(app, [*args, "--as", "kit/kit:v1", "--plain-http", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["skipped"] is True
    out = CliRunner().invoke(app, [*args, "--as", "kit/kit:v2", "--plain-http"])
    assert out.exit_code == 0, out.output
    assert f"({manifest_digest}) as kit/kit:v2" in out.stdout
    out = CliRunner().invoke(app, [*args, "--as", "kit/kit:v3"])  # HTTPS to a plain-HTTP port
    assert out.exit_code == 1 and "--plain-http" in out.output


# -- other artifacts: ORAS (Go) directories, untitled blobs and tars, Docker images ------------
@pytest.mark.service
def _spy_on_reuse(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """``{path: whether the publish took it from the file cache}`` for every file a content
    pipeline adds from now on (the real ``add`` runs)."""
    from cvmfs_ml.publish.ingest import ContentPipeline

    reused: dict[str, bool] = {}
    real_add = ContentPipeline.add

    def add(self: ContentPipeline, item: Any) -> Any:
        pending = real_add(self, item)
        reused[item.path] = pending.known is not None
        return pending

    monkeypatch.setattr(ContentPipeline, "add", add)
    return reused


def test_blob_files_are_not_hashed_again(
    docker_registry: Any, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer blob laid out as one file was verified against its digest when fetched: the
    models layer takes that SHA-256 instead of reading the (multi-GiB) file again."""
    import cvmfs_ml.models.sources.local as local_source

    base, repo = docker_registry.url, "ml/two-files"
    weights, config = random.Random(7).randbytes(300_000), b'{"layers": 2}\n'
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.model",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   **push_blob(base, repo, b"{}")},
        "layers": [
            {"mediaType": "application/octet-stream", **push_blob(base, repo, weights),
             "annotations": {ANNOTATION_TITLE: "weights/model.bin"}},
            {"mediaType": "application/json", **push_blob(base, repo, config),
             "annotations": {ANNOTATION_TITLE: "config.json"}},
        ],
    }  # fmt: skip
    push_manifest(base, repo, "v1", manifest)
    read_again: list[str] = []
    real_sha256 = local_source._sha256

    def counting(file: Any) -> Any:
        read_again.append(file.path)
        return real_sha256(file)

    monkeypatch.setattr(local_source, "_sha256", counting)
    reused = _spy_on_reuse(monkeypatch)
    ingest_oci(publisher, f"oci://{docker_registry.host}/{repo}:v1",
               ModelRef.parse("fast/model:1"), plain_http=True)  # fmt: skip
    assert read_again == []
    # the weights were stored while they downloaded (BlobIngest): the publish read nothing
    assert reused["/blob"] is False and reused["/fast/model/1/weights/model.bin"] is True
    expected = {"weights/model.bin": sha256(weights), "config.json": sha256(config)}
    assert record_of(publisher, "fast/model:1").digests() == expected
    assert read_back(publisher, "/fast/model/1") == expected  # the bytes agree with the record


def test_known_file_digests_only_when_every_layer_is_a_file() -> None:
    hexdigest = "ab" * 32
    files = {"type": "oci", "kind": "artifact", "layers": [
        {"as": "file", "path": "a.bin", "digest": f"sha256:{hexdigest}"},
        {"as": "file", "path": "b/c.json", "digest": f"sha256:{'cd' * 32}"},
    ]}  # fmt: skip
    assert known_file_digests(files) == {"a.bin": hexdigest, "b/c.json": "cd" * 32}
    unpacked = {"as": "unpacked", "digest": "sha256:" + "e" * 64}
    mixed = {**files, "layers": [*files["layers"], unpacked]}
    assert known_file_digests(mixed) == {}  # an unpacked layer may write over a file's path
    assert known_file_digests({**files, "kind": "image"}) == {}
    assert known_file_digests({**files, "subpath": "models"}) == {}
    other = {**files, "layers": [{"as": "file", "path": "a.bin", "digest": "sha512:" + "0" * 128}]}
    assert known_file_digests(other) == {}
    assert known_file_digests({"type": "mlflow"}) == {} and known_file_digests(None) == {}
    assert known_file_digests({**files, "layers": []}) == {}


def test_generic_artifact_layers(docker_registry: Any, publisher: Publisher) -> None:
    base, repo = docker_registry.url, "ml/generic"
    packed_dir = gz(make_tar([("weights", None), ("weights/a.bin", b"A" * 1000)]))
    untitled_tar = make_tar([("extra/notes.txt", b"notes\n")])
    raw = b"\x00raw blob with no name\xff"
    layers = [
        # `oras push dir/` (Go) marks packed directories with io.deis.oras.content.unpack.
        ("application/vnd.oci.image.layer.v1.tar+gzip", packed_dir,
         {ANNOTATION_TITLE: "weights", "io.deis.oras.content.unpack": "true"}),
        # A titled blob is a file, even when its media type claims tar+gzip.
        ("application/vnd.oci.image.layer.v1.tar+gzip", gz(b"not a tar"),
         {ANNOTATION_TITLE: "data.gz"}),
        ("application/x-tar", untitled_tar, {}),
        ("application/vnd.example.blob", raw, {}),
    ]  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.model",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            **push_blob(base, repo, b"{}"),
        },
        "layers": [
            {"mediaType": mt, **push_blob(base, repo, blob), **({"annotations": a} if a else {})}
            for mt, blob, a in layers
        ],
    }
    push_manifest(base, repo, "v1", manifest)
    result = ingest_oci(publisher, f"oci://{docker_registry.host}/{repo}:v1",
                        ModelRef.parse("gen/model:1"), plain_http=True)  # fmt: skip
    assert result.source["kind"] == "artifact"
    assert read_back(publisher, "/gen/model/1") == {
        "weights/a.bin": sha256(b"A" * 1000),
        "data.gz": sha256(gz(b"not a tar")),
        "extra/notes.txt": sha256(b"notes\n"),
        digest(raw).replace(":", "-"): sha256(raw),
    }


@pytest.mark.service
def test_docker_schema2_image(docker_registry: Any, publisher: Publisher) -> None:
    base, repo = docker_registry.url, "ml/docker"
    layer = make_tar([("app", None), ("app/model.bin", b"weights"), ("app/.wh.missing", b"")])
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
              "diff_ids": [digest(layer)]}}  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            **push_blob(base, repo, json.dumps(config).encode()),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                **push_blob(base, repo, gz(layer)),
            }
        ],
    }
    manifest_digest = push_manifest(base, repo, "v1", manifest)
    result = ingest_oci(publisher, f"oci://{docker_registry.host}/{repo}:v1",
                        ModelRef.parse("dock/app:1"), plain_http=True)  # fmt: skip
    assert result.source["kind"] == "image"
    assert result.source["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert result.source["manifest_digest"] == manifest_digest
    assert read_back(publisher, "/dock/app/1") == {"app/model.bin": sha256(b"weights")}


# -- a container image: gzip + zstd layers, whiteouts, reached through an index --------------------
def push_image(base: str, repo: str, tag: str) -> dict[str, Any]:
    lower = make_tar(
        [
            ("etc", None),
            ("etc/keep.txt", b"keep\n"),
            ("etc/gone.txt", b"deleted by a whiteout\n"),
            ("opt", None),
            ("opt/app", None),
            ("opt/app/old1", b"old 1\n"),
            ("opt/app/old2", b"old 2\n"),
            ("bin", None),
            ("bin/tool", b"#!/bin/sh\necho tool\n"),
            ("bin/X11", "->."),  # Debian has /usr/bin/X11 -> . : a loop, dropped
            ("usr", None),
            ("usr/bin", "->/bin"),  # absolute: resolved inside the image, not on the host
            ("etc/tool", "->../../../bin/tool"),  # '..' stops at the image root
            ("etc/mtab", "->/proc/mounts"),  # dangles inside the image: dropped
            ("models", None),
            ("models/net.onnx", b"net v1\n"),
            ("models/alias.onnx", "=>models/net.onnx"),
        ]
    )
    upper = make_tar(
        [
            ("etc", None),
            ("etc/.wh.gone.txt", b""),
            ("opt/app", None),
            ("opt/app/.wh..wh..opq", b""),
            ("opt/app/new", b"new\n"),
            ("models/net.onnx", b"net v2\n"),
        ]
    )
    layers = [
        ("application/vnd.oci.image.layer.v1.tar+gzip", gz(lower), lower),
        ("application/vnd.oci.image.layer.v1.tar+zstd", zst(upper), upper),
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": [digest(raw) for _, _, raw in layers]},
        "history": [{"created_by": "test"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **push_blob(base, repo, json.dumps(config).encode()),
        },
        "layers": [{"mediaType": mt, **push_blob(base, repo, blob)} for mt, blob, _ in layers],
    }
    body = json.dumps(manifest).encode()
    image_digest = push_manifest(base, repo, "amd64-only", manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {  # listed first, must be passed over for linux/amd64
                "mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(body),
                "platform": {"os": "linux", "architecture": "arm64"},
            },
            {
                "mediaType": OCI_MANIFEST, "digest": image_digest, "size": len(body),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }  # fmt: skip
    index_digest = push_manifest(base, repo, tag, index)
    return {"image": image_digest, "index": index_digest}


@pytest.mark.service
def test_image_layers_with_whiteouts(docker_registry: Any, publisher: Publisher) -> None:
    digests = push_image(docker_registry.url, "ml/image", "latest")
    result = ingest_oci(
        publisher, f"oci://{docker_registry.host}/ml/image", ModelRef.parse("img/app:1"),
        plain_http=True,
    )  # fmt: skip
    assert result.source["kind"] == "image"
    assert result.source["manifest_digest"] == digests["image"]
    assert result.source["index_digest"] == digests["index"]
    files = read_back(publisher, "/img/app/1")
    tool = sha256(b"#!/bin/sh\necho tool\n")
    assert files == {
        "etc/keep.txt": sha256(b"keep\n"),
        "etc/tool": tool,
        "opt/app/new": sha256(b"new\n"),
        "bin/tool": tool,
        "usr/bin/tool": tool,  # model versions hold plain files: folder links are followed
        "models/net.onnx": sha256(b"net v2\n"),
        "models/alias.onnx": sha256(b"net v1\n"),  # a hard link keeps the content it linked
    }
    with published(publisher) as repo:
        names = sorted(e.path.rsplit("/", 1)[-1] for e in repo.listdir("/img/app/1/etc"))
    assert names == ["keep.txt", "tool"]  # neither the whiteout nor what it hid
    record = record_of(publisher, "img/app:1")
    assert record.source["config"]["Cmd"] == ["/bin/tool"]
    assert [layer["whiteouts"] for layer in record.source["layers"]] == [0, 2]
    assert record.source["symlinks"]["dropped_paths"] == ["bin/X11", "etc/mtab"]

    before = repo_state(publisher)
    assert ingest_oci(
        publisher, f"{docker_registry.host}/ml/image:latest", ModelRef.parse("img/app:1"),
        plain_http=True,
    ).skipped  # fmt: skip
    assert repo_state(publisher) == before

    # A modelcar: only the image's /models folder becomes the model version.
    ingest_oci(
        publisher, f"{docker_registry.host}/ml/image", ModelRef.parse("img/modelcar:1"),
        plain_http=True, subpath="/models/",
    )  # fmt: skip
    assert read_back(publisher, "/img/modelcar/1") == {
        "net.onnx": sha256(b"net v2\n"), "alias.onnx": sha256(b"net v1\n"),
    }  # fmt: skip
    assert record_of(publisher, "img/modelcar:1").source["subpath"] == "models"


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


@pytest.fixture
def token_front(docker_registry: Any) -> Iterator[TokenFront]:
    server = TokenFront(docker_registry.url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.service
def test_bearer_token_auth(
    docker_registry: Any, token_front: TokenFront, publisher: Publisher
) -> None:
    manifest_digest, expected = push_modelpack(docker_registry.url, "ml/private", "v1")
    reference = f"{token_front.host}/ml/private:v1"
    with pytest.raises(DownloadError, match="token request answered 401"):
        ingest_oci(publisher, reference, ModelRef.parse("p/private:v1"), plain_http=True)
    result = ingest_oci(
        publisher, reference, ModelRef.parse("p/private:v1"), plain_http=True,
        username="alice", password="secret",
    )  # fmt: skip
    assert result.source["manifest_digest"] == manifest_digest
    assert read_back(publisher, "/p/private/v1")["src/infer.py"] == sha256(expected["src/infer.py"])
    # One token per scope: the manifest and all blobs went through with the first token.
    assert sum("scope=x%3Ay%3Apull" in path for path in token_front.token_requests) == 2


@pytest.mark.service
def test_blob_size_and_digest_are_checked(docker_registry: Any, tmp_path: Path) -> None:
    descriptor = push_blob(docker_registry.url, "ml/blob", b"twelve bytes")
    with RegistryClient(docker_registry.host, plain_http=True) as client:
        path = client.fetch_blob("ml/blob", descriptor["digest"], tmp_path / "ok", size=12)
        assert path.read_bytes() == b"twelve bytes"
        with pytest.raises(IntegrityError):
            client.fetch_blob("ml/blob", descriptor["digest"], tmp_path / "short", size=5)
        assert not (tmp_path / "short").exists()
        assert list(tmp_path.iterdir()) == [tmp_path / "ok"]  # no .part left behind


# -- unit tests: references, classification, unsafe layers (no registry) ---------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci://127.0.0.1:5000/ml/model:v1", ("127.0.0.1:5000", "ml/model", "v1", None)),
        ("localhost/a/b/c", ("localhost", "a/b/c", "latest", None)),
        ("ghcr.io/org/m@sha256:" + "a" * 64, ("ghcr.io", "org/m", None, "sha256:" + "a" * 64)),
        ("ubuntu:24.04", ("docker.io", "library/ubuntu", "24.04", None)),
    ],
)
def test_reference_parsing(text: str, expected: tuple[Any, ...]) -> None:
    ref = OciReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["host:5000/UPPER/case", "h.io/a:b:c", "h.io/a@sha256:abc", ""])
def test_bad_references(text: str) -> None:
    with pytest.raises(FormatError):
        OciReference.parse(text)


def test_classify() -> None:
    image = {"config": {"mediaType": "application/vnd.oci.image.config.v1+json"}, "layers": []}
    assert classify(image) == "image"
    titled = {**image, "layers": [{"annotations": {ANNOTATION_TITLE: "f"}}]}
    assert classify(titled) == "artifact"
    assert classify({"artifactType": MODELPACK_ARTIFACT, "layers": []}) == "modelpack"
    assert classify({"config": {"mediaType": KITOPS_CONFIG}, "layers": []}) == "kitops"


@pytest.mark.parametrize(
    ("entries", "rootfs"),
    [
        ([("../evil", b"x")], False),
        ([("/etc/passwd", b"x")], True),
        ([("a/../../evil", b"x")], True),
        ([("link", "->/etc")], False),
        ([("d", None), ("d/link", "->../../out")], False),
        ([("hard", "=>../outside")], True),
        ([("link", "->/tmp"), ("link/file", b"x")], True),  # writing through a symlink
    ],
)
def test_unsafe_layers_are_refused(
    tmp_path: Path, entries: list[tuple[str, Any]], rootfs: bool
) -> None:
    writer = TreeWriter(tmp_path / "out", rootfs=rootfs)
    with pytest.raises(UnsafeInputError):
        writer.apply_tar(io.BytesIO(make_tar(entries)))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_device_files_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("dev/null")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(info)
    with pytest.raises(UnsafeInputError, match="device"):
        TreeWriter(tmp_path / "out", rootfs=True).apply_tar(io.BytesIO(buffer.getvalue()))


def test_symlink_layers_cannot_redirect_later_layers(tmp_path: Path) -> None:
    """Layer 1 makes ``d`` a symlink out of the tree; layer 2 writes ``d/x``: refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    writer = TreeWriter(tmp_path / "root", rootfs=True)
    writer.apply_tar(io.BytesIO(make_tar([("d", f"->{outside}")])))
    with pytest.raises(UnsafeInputError, match="symlink"):
        writer.apply_tar(io.BytesIO(make_tar([("d/x", b"pwned")])))
    assert list(outside.iterdir()) == []


def test_safe_relative() -> None:
    assert safe_relative("./a//b/") == "a/b"
    assert safe_relative(".") == ""
    for bad in ("/a", "a/../..", ".."):
        with pytest.raises(UnsafeInputError):
            safe_relative(bad)


# -- blobs stored while they download (sync) -------------------------------------------------------
def _layout(publisher: Publisher, path: str) -> tuple[object, ...]:
    with published(publisher) as repo:
        layout = repo.layout(path)
        return tuple((p.offset, p.size, p.digest.hex) for p in layout.pieces), layout.chunked


def test_a_streamed_blob_is_published_unread_as_a_plain_publish_would(
    docker_registry: Any, publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvmfs_ml.models.publish import publish_model
    from cvmfs_ml.models.sources.blob_ingest import BlobIngest
    from cvmfs_ml.models.sources.oci import pull, resolve

    base, repo = docker_registry.url, "ml/streamed"
    # compressible and incompressible halves: compression and chunk cuts both matter
    weights = bytes(range(256)) * 2000 + random.Random(3).randbytes(700_000)
    config = b'{"hidden": 8}\n'  # below the chunk size: downloaded as before
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.x.model",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   **push_blob(base, repo, b"{}")},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar",  # what oras-py sends
             **push_blob(base, repo, weights), "annotations": {ANNOTATION_TITLE: "weights.bin"}},
            {"mediaType": "application/json", **push_blob(base, repo, config),
             "annotations": {ANNOTATION_TITLE: "config.json"}},
        ],
    }  # fmt: skip
    push_manifest(base, repo, "v1", manifest)
    reused = _spy_on_reuse(monkeypatch)
    ingest = BlobIngest(publisher)
    with RegistryClient(docker_registry.host, plain_http=True) as client:
        resolved = resolve(client, OciReference.parse(f"{docker_registry.host}/{repo}:v1"))
        pulled = pull(client, resolved, tmp_path / "model", blob_dir=tmp_path / "blobs",
                      keep_blobs=False, ingest=ingest)  # fmt: skip
    assert reused == {"/blob": False}  # the weights went through the pipeline as they came
    assert ingest.remember(pulled.folder, pulled.source) == 1
    publish_model(publisher, pulled.folder, ModelRef.parse("s/m:1"), source=pulled.source,
                  known_sha256=known_file_digests(pulled.source))  # fmt: skip
    assert reused["/s/m/1/weights.bin"] is True  # the publish took the stored objects
    assert reused["/s/m/1/config.json"] is False
    plain = create_repository(tmp_path / "plain-srv", "plain.test", settings=publisher.settings)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.bin").write_bytes(weights)
    (tmp_path / "plain" / "config.json").write_bytes(config)
    publish_model(plain, tmp_path / "plain", ModelRef.parse("s/m:1"))
    streamed = _layout(publisher, "/s/m/1/weights.bin")
    assert streamed == _layout(plain, "/s/m/1/weights.bin")  # the same chunks and objects
    assert streamed[1] is True and len(streamed[0]) > 3
    assert read_back(publisher, "/s/m/1") == {"weights.bin": sha256(weights),
                                              "config.json": sha256(config)}  # fmt: skip


def test_a_streamed_blob_longer_than_its_manifest_says_is_refused(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    from cvmfs_ml.models.sources.blob_ingest import BlobIngest

    data = random.Random(4).randbytes(300_000)
    descriptor = push_blob(docker_registry.url, "ml/liar", data)
    ingest = BlobIngest(publisher)
    dest = tmp_path / "blobs" / "liar"
    dest.parent.mkdir()
    with RegistryClient(docker_registry.host, plain_http=True) as client:
        with pytest.raises(IntegrityError):
            ingest.fetch(client, "ml/liar", descriptor["digest"], 200_000, dest)
        assert list(dest.parent.iterdir()) == []  # neither the blob nor a partial file
        assert ingest.fetch(client, "ml/liar", descriptor["digest"], 300_000, dest) == dest
    assert dest.read_bytes() == data  # the stream is free again after the failure
    (tmp_path / "m").mkdir()
    os.replace(dest, tmp_path / "m" / "w.bin")
    source = {"type": "oci", "layers": [{"digest": descriptor["digest"], "as": "file",
                                         "path": "w.bin"}]}  # fmt: skip
    assert ingest.remember(tmp_path / "m", source) == 1
    (tmp_path / "m" / "w.bin").write_bytes(data[:-1])  # not the blob's size: not recorded
    assert ingest.remember(tmp_path / "m", source) == 0


def test_a_streamed_blob_whose_bytes_do_not_match_its_digest_is_refused(
    docker_registry: Any, publisher: Publisher, tmp_path: Path
) -> None:
    """The blob is stored as objects while it downloads: a blob altered in the registry's
    storage (same size, one bit) is refused all the same, and its content never recorded."""
    from cvmfs_ml.models.sources.blob_ingest import BlobIngest

    data = random.Random(5).randbytes(3 * 2**20 + 11)
    descriptor = push_blob(docker_registry.url, "ml/tampered", data)
    stored = [p for p in docker_registry.storage.rglob("data") if p.read_bytes() == data]
    assert len(stored) == 1
    stored[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, in the last block
    ingest = BlobIngest(publisher)
    dest = tmp_path / "blobs" / "tampered"
    dest.parent.mkdir()
    with (
        RegistryClient(docker_registry.host, plain_http=True) as client,
        pytest.raises(IntegrityError),
    ):
        ingest.fetch(client, "ml/tampered", descriptor["digest"], len(data), dest)
    assert list(dest.parent.iterdir()) == []  # neither the blob nor a partial file
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(data)
    source = {"type": "oci", "layers": [{"digest": descriptor["digest"], "as": "file",
                                         "path": "w.bin"}]}  # fmt: skip
    assert ingest.remember(tmp_path / "m", source) == 0  # its content was never recorded


def test_file_metadata_annotations_of_any_shape() -> None:
    """ModelPack's per-file metadata is an annotation anyone can write: a JSON list, a mode
    that is not a number, an mtime of 1e400 (inf) or in year 1 fall back to the defaults
    instead of failing the layout (os.utime refuses inf) or raising AttributeError."""
    from cvmfs_ml.models.sources.oci import _file_metadata
    from cvmfs_ml.models.sources.oci_manifest import ANNOTATION_FILE_METADATA as KEY

    assert _file_metadata({KEY: '{"mode": 420, "mtime": "2025-01-02T03:04:05Z"}'}) == (
        0o644, 1735787045.0,
    )  # fmt: skip
    for raw in ("[1, 2]", '"text"', "1e400", '{"mode": "rwx", "mtime": 1e400}',
                '{"mtime": true}', '{"mtime": "0001-01-01T00:00:00"}', "{" * 5000):  # fmt: skip
        assert _file_metadata({KEY: raw}) == (0o644, None), raw
