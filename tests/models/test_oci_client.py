"""The OCI registry client: token auth, blob checks, references, manifest classification.

Bearer-token auth goes through a token front (``oci_helpers.TokenFront``) in front of Debian's
``docker-registry`` on loopback; blobs fetched with a wrong size are refused and leave nothing
behind. The unit tests (no registry) parse image references and classify manifests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_ml.errors import DownloadError, FormatError, IntegrityError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.oci import (
    ANNOTATION_TITLE,
    KITOPS_CONFIG,
    MODELPACK_ARTIFACT,
    classify,
    ingest_oci,
)
from cvmfs_ml.models.sources.oci_client import OciReference, RegistryClient
from cvmfs_ml.publish.repository import Publisher

from .oci_helpers import TokenFront, push_blob, push_modelpack, read_back, sha256


# -- token auth: a Bearer-challenging front in front of the real registry --------------------------
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


# -- unit tests: references, classification (no registry) ------------------------------------------
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
