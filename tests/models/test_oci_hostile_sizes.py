"""``cvmfs-ml model ingest`` of OCI artifacts and images whose sizes are hostile.

A layer declared 2^60 bytes (the sweep's registry then streamed zeros into scratch at 180 MB/s:
ingest had no declared-size limit, unlike sync), a manifest number of 5000 digits (Python's own
words reached the user), a gzip bomb and a sparse tar member. Each is refused with one line
naming the limit; sizes are claimed, not made (the largest file written is a few MiB).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.cli.model import model_app
from cvmfs_ml.cvmfs import jsontext
from cvmfs_ml.errors import FormatError, PublishError
from cvmfs_ml.models.layout import ModelRef
from cvmfs_ml.models.sources.limits import MAX_BYTES, UNPACK_FLOOR, UNPACK_RATIO, UnpackBudget
from cvmfs_ml.models.sources.oci import ANNOTATION_TITLE, ingest_oci
from cvmfs_ml.publish.repository import Publisher, create_repository
from hostile_registry import IMAGE_CONFIG, TAR_GZIP, HostileRegistry, image_manifest
from models.oci_helpers import make_tar, push_blob, push_manifest, repo_state
from sync.test_sync_hostile_sizes import sparse_layer

app = typer.Typer()
app.add_typer(model_app, name="model")

ARTIFACT_CONFIG = "application/vnd.unknown.config.v1+json"


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return create_repository(tmp_path / "srv", "sizes.test")


def ingest(publisher: Publisher, reference: str, *args: str) -> str:
    """``cvmfs-ml model ingest`` that must fail; its one stderr line."""
    result = CliRunner().invoke(
        app,
        ["model", "ingest", reference, "--repo", str(publisher.repo_dir),
         "--keys", str(publisher.keys_dir), "--as", "ns/hostile:v1", "--plain-http", *args],
    )  # fmt: skip
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("declared", "args"), [(2**60, []), (2000, ["--max-bytes", "1000"])], ids=["2^60", "option"]
)
def test_a_declared_size_over_the_limit_is_refused_before_any_download(
    publisher: Publisher, declared: int, args: list[str]
) -> None:
    before = repo_state(publisher)
    with HostileRegistry() as hostile:
        config = hostile.blob(b"{}", ARTIFACT_CONFIG)
        weights = {
            "mediaType": "application/octet-stream",
            "digest": "sha256:" + "ab" * 32,  # never served: asking for it is the failure
            "size": declared,
            "annotations": {ANNOTATION_TITLE: "w.bin"},
        }
        hostile.manifest("sizes/endless", "v1", image_manifest(config, [weights]))
        line = ingest(publisher, f"oci://{hostile.host}/sizes/endless:v1", *args)
        assert not hostile.asked_for(weights["digest"])
    limit = int(args[1]) if args else MAX_BYTES
    assert f"declares {declared} bytes of layers, more than the limit of {limit}" in line
    assert "(--max-bytes)" in line
    assert repo_state(publisher) == before


def test_a_size_of_5000_digits_is_malformed_json(publisher: Publisher) -> None:
    with HostileRegistry() as hostile:
        layer = hostile.blob(b"weights", "application/octet-stream")
        config = hostile.blob(b"{}", ARTIFACT_CONFIG)
        text = json.dumps(image_manifest(config, [layer]))
        hostile.manifest("sizes/digits", "v1", text.replace('"size": 7', '"size": ' + "9" * 5000)
                         .encode())  # fmt: skip
        line = ingest(publisher, f"oci://{hostile.host}/sizes/digits:v1")
    assert "not JSON: a number with more than 4300 digits" in line
    assert "Exceeds the limit" not in line  # Python's words, and its advice to raise the limit


def test_catalog_markers_of_titled_layers_are_bounded(publisher: Publisher) -> None:
    """A titled layer is a file of that name: three layers titled ``m<i>/.cvmfscatalog`` made
    three nested catalogs, counted by no limit (only tar members were). A pushed model is
    held to ``max_catalogs`` (the registry passes its ``max_tar_catalogs``), like a folder."""
    before = repo_state(publisher)
    with HostileRegistry() as hostile:
        config = hostile.blob(b"{}", ARTIFACT_CONFIG)
        layers = [{**hostile.blob(f"m{i}".encode(), "application/octet-stream"),
                   "annotations": {ANNOTATION_TITLE: f"m{i}/w.bin"}} for i in range(3)]  # fmt: skip
        marker = hostile.blob(b"", "application/octet-stream")
        layers += [{**marker, "annotations": {ANNOTATION_TITLE: f"m{i}/.cvmfscatalog"}}
                   for i in range(3)]  # fmt: skip
        hostile.manifest("sizes/markers", "v1", image_manifest(config, layers))
        reference = f"oci://{hostile.host}/sizes/markers:v1"
        with pytest.raises(PublishError, match=r"more than 2 \.cvmfscatalog files"):
            ingest_oci(publisher, reference, ModelRef.parse("ns/markers:v1"), plain_http=True,
                       max_catalogs=2)  # fmt: skip
        assert repo_state(publisher) == before
        result = ingest_oci(publisher, reference, ModelRef.parse("ns/markers:v1"),
                            plain_http=True, max_catalogs=3)  # fmt: skip
    assert sorted(f.path for f in result.record.files)[:3] == [
        "m0/.cvmfscatalog", "m0/w.bin", "m1/.cvmfscatalog"
    ]


@pytest.mark.service
def test_a_gzip_bomb_stops_at_the_unpacked_limit(
    docker_registry: Any, publisher: Publisher
) -> None:
    repository = "sizes/bomb-artifact"
    layer = gzip.compress(make_tar([("zeros", bytes(4 * 2**20))]), mtime=0)
    config = push_blob(docker_registry.url, repository, b"{}")
    manifest = image_manifest(
        {"mediaType": ARTIFACT_CONFIG, **config},
        [{"mediaType": TAR_GZIP, **push_blob(docker_registry.url, repository, layer)}],
    )
    push_manifest(docker_registry.url, repository, "v1", manifest)
    reference = f"oci://{docker_registry.host}/{repository}:v1"
    before = repo_state(publisher)
    line = ingest(publisher, reference, "--max-unpacked-bytes", str(2**20))
    assert "layer sha256:" in line and "unpacks to more than 1048576 bytes (at 'zeros')" in line
    assert repo_state(publisher) == before
    # the default (20 times the declared bytes, at least 1 GiB) takes the 4 MiB file
    result = ingest_oci(publisher, reference, ModelRef.parse("ns/bomb:v1"), plain_http=True)
    assert result.record.size == 4 * 2**20


@pytest.mark.service
def test_a_sparse_member_is_refused(docker_registry: Any, publisher: Publisher) -> None:
    repository = "sizes/sparse-image"
    layer = gzip.compress(sparse_layer(2**26), mtime=0)
    config = push_blob(docker_registry.url, repository, b'{"os": "linux"}')
    manifest = image_manifest(
        {"mediaType": IMAGE_CONFIG, **config},
        [{"mediaType": TAR_GZIP, **push_blob(docker_registry.url, repository, layer)}],
    )
    push_manifest(docker_registry.url, repository, "v1", manifest)
    before = repo_state(publisher)
    with pytest.raises(FormatError, match=r"'holes' is a sparse file \(declaring 67108864 bytes\)"):
        ingest_oci(
            publisher, f"oci://{docker_registry.host}/{repository}:v1",
            ModelRef.parse("ns/sparse:v1"), plain_http=True,
        )  # fmt: skip
    assert repo_state(publisher) == before


def test_the_default_unpacked_limit() -> None:
    small = UnpackBudget.for_layers([{"size": 4 * 2**20}])  # the sweep's 4 MiB bomb
    assert small.limit == UNPACK_FLOOR == 2**30  # so its 4 GiB stop at 1 GiB
    large = UnpackBudget.for_layers([{"size": 2**30}, {"size": 2**30}])
    assert large.limit == UNPACK_RATIO * 2**31
    assert UnpackBudget.for_layers([{"size": 2**40}], max_unpacked=10).limit == 10
    small.spend(2**30, "layer x", "a")
    with pytest.raises(FormatError, match="layer x: unpacks to more than 1073741824 bytes"):
        small.spend(1, "layer x", "b")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" + "9" * 5000 + "]", "a number with more than 4300 digits"),
        (b'"\xff"', "not UTF-8 text"),
        ("[" * 100_000, "nested too deeply"),
        ("{", "Expecting property name"),
    ],
)
def test_jsontext_every_failure_is_a_decode_error(text: Any, reason: str) -> None:
    with pytest.raises(json.JSONDecodeError, match=reason):
        jsontext.loads(text)
