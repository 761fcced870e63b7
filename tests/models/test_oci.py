"""OCI ingest of artifacts: ORAS, ModelPack, KitOps and generic layers from a real registry.

The registry is Debian's ``docker-registry`` (CNCF distribution 2.x) on loopback. ORAS artifacts
are pushed with the ``oras`` package, as users do; ModelPack, KitOps and other manifests are
built here and pushed through the distribution API (oras-py cannot set ``artifactType`` or push
image configs). Every test reads the published files back through
:class:`cvmfs_ml.client.repository.Repository` and compares SHA-256 with what was pushed.

Also here: blob files whose digest is reused instead of read again, blobs stored as objects
while they download (and refused when their size or digest is wrong), and ModelPack per-file
metadata annotations. Container images are in ``test_oci_images.py``; token auth, blob checks
and reference parsing in ``test_oci_client.py``; the shared helpers in ``oci_helpers.py``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.ingest import model_ingest
from cvmfs_ml.errors import IntegrityError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import (
    ANNOTATION_TITLE,
    KITOPS_CONFIG,
    MODELPACK_ARTIFACT,
    ingest_oci,
    known_file_digests,
)
from cvmfs_ml.models.sources.oci_client import OCI_MANIFEST, OciReference, RegistryClient
from cvmfs_ml.publish.repository import Publisher, create_repository

from .oci_helpers import (
    digest,
    gz,
    make_tar,
    published,
    push_blob,
    push_manifest,
    push_modelpack,
    read_back,
    record_of,
    registry_digest,
    repo_state,
    sha256,
)


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


# -- other artifacts: ORAS (Go) directories, untitled blobs and tars, digests reused ---------------
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


@pytest.mark.service
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


@pytest.mark.service
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


# -- blobs stored while they download (sync) -------------------------------------------------------
def _layout(publisher: Publisher, path: str) -> tuple[object, ...]:
    with published(publisher) as repo:
        layout = repo.layout(path)
        return tuple((p.offset, p.size, p.digest.hex) for p in layout.pieces), layout.chunked


@pytest.mark.service
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


@pytest.mark.service
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


@pytest.mark.service
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
