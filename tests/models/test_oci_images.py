"""OCI ingest of container images from a real registry, and the safety of unpacking layers.

The registry is Debian's ``docker-registry`` (CNCF distribution 2.x) on loopback; image
manifests, configs and layers are built here and pushed through the distribution API. A Docker
schema2 image, and an OCI image reached through an index with gzip and zstd layers, whiteouts,
opaque folders, symlinks and hard links (and a modelcar's ``/models`` subpath). The unit tests
(no registry) refuse layers that write outside the tree, device files and symlinks that would
redirect later layers.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.errors import UnsafeInputError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import ingest_oci
from cvmfs_ml.models.sources.oci_client import OCI_INDEX, OCI_MANIFEST
from cvmfs_ml.models.sources.unpack import TreeWriter, safe_relative
from cvmfs_ml.publish.repository import Publisher

from .oci_helpers import (
    digest,
    gz,
    make_tar,
    published,
    push_blob,
    push_manifest,
    read_back,
    record_of,
    repo_state,
    sha256,
    zst,
)


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


# -- unit tests: unsafe layers (no registry) -------------------------------------------------------
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
