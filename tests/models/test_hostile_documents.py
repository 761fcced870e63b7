"""JSON documents from outside give only our errors, whatever their field types.

``model.json`` and ``/.cvmfs-ml/index.json`` are read from repositories other people publish,
OCI manifests and indexes from registries, webhook bodies from the network. Each genuine
document is parsed, then every field in turn (and the document itself) is replaced by a value of
each JSON type: the parser must accept it or raise a :class:`~cvmfs_ml.errors.CvmfsMlError`,
never a ``TypeError`` or ``AttributeError`` from deep inside (which in a sync round stopped
every other image, and in the webhook handler dropped the connection instead of a 400).
Deterministic: every replacement, every run.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.models.layout import Index, ModelRecord
from cvmfs_ml.models.sources.oci_manifest import check_index, check_manifest, classify
from cvmfs_ml.sync.webhook import parse_notification

DIGEST = "sha256:" + "a" * 64
RECORD = {
    "schema": "cvmfs-ml.model/1", "namespace": "hep", "name": "tagger", "version": "1",
    "format": "onnx", "description": "d", "license": "mit", "created": "2026-01-01T00:00:00Z",
    "published_by": "x", "source": {"type": "local", "path": "/x"}, "size": 10,
    "file_count": 1, "files": [{"path": "a.onnx", "size": 10, "sha256": "0" * 64}],
    "models": {"a.onnx": {"format": "onnx", "parameters": 3}}, "extra": {}, "warnings": [],
}  # fmt: skip
INDEX = {
    "schema": "cvmfs-ml.index/1", "updated": "x",
    "models": {"hep/tagger": {"versions": {"1": {"format": "onnx", "size": 10}},
                              "aliases": {"prod": "1"}}},
}  # fmt: skip
DOCKER = {"events": [{
    "action": "push", "request": {"host": "r:5000"},
    "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "repository": "lib/x", "tag": "1", "digest": DIGEST},
}]}  # fmt: skip
HARBOR = {"type": "PUSH_ARTIFACT", "event_data": {
    "resources": [{"tag": "1", "digest": DIGEST, "resource_url": "r:5000/lib/x:1"}],
    "repository": {"repo_full_name": "lib/x", "namespace": "lib", "name": "x"},
}}  # fmt: skip
MANIFEST = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "artifactType": "application/vnd.example", "annotations": {"a": "b"},
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": DIGEST, "size": 2},
    "layers": [{"mediaType": "application/octet-stream", "digest": DIGEST, "size": 5,
                "annotations": {"org.opencontainers.image.title": "w.bin"}}],
}  # fmt: skip
IMAGE_INDEX = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST,
                   "size": 7, "platform": {"os": "linux", "architecture": "amd64"}}],
}  # fmt: skip

VALUES = [None, True, 0, -1, 2**70, 1.5, "", "../x", "a/b", "\x00", [], [1], {}, {"a": 1}]


def _manifest(document: Any) -> Any:
    if not isinstance(document, dict):
        return None  # the client refuses a body that is not an object before this
    check_manifest(document, "manifest")
    return classify(document)  # what reads the fields after the check


def _index(document: Any) -> Any:
    if isinstance(document, dict):
        check_index(document, "image index")


PARSERS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "model.json": (RECORD, ModelRecord.from_json),
    "index.json": (INDEX, lambda d: Index.from_bytes(json.dumps(d).encode()).records()),
    "docker notification": (DOCKER, lambda d: parse_notification(json.dumps(d).encode())),
    "harbor webhook": (HARBOR, lambda d: parse_notification(json.dumps(d).encode())),
    "OCI manifest": (MANIFEST, _manifest),
    "OCI index": (IMAGE_INDEX, _index),
}


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    children = document.items() if isinstance(document, dict) else (
        enumerate(document) if isinstance(document, list) else ()
    )  # fmt: skip
    for key, value in children:
        yield from _paths(value, (*prefix, key))


def _replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(document)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return out


@pytest.mark.parametrize("what", sorted(PARSERS))
def test_every_field_of_every_type(what: str) -> None:
    genuine, parse = PARSERS[what]
    parse(copy.deepcopy(genuine))  # the genuine document parses
    refused = 0
    for path in _paths(genuine):
        for value in VALUES:
            try:
                parse(_replaced(genuine, path, value))
            except CvmfsMlError:
                refused += 1
            except Exception as exc:
                pytest.fail(f"{what}: {'/'.join(map(str, path)) or '(document)'} = {value!r}: "
                            f"{type(exc).__name__}: {exc}")  # fmt: skip
    assert refused > 0  # the checks do refuse things (the test could fail both ways)


def test_index_names_and_labels_are_checked() -> None:
    for models in (
        {"no-slash": {"versions": {}}},
        {"hep/../x": {"versions": {}}},
        {"hep/tagger": {"versions": {"../1": {}}}},
        {"hep/tagger": {"versions": {"1": {}}, "aliases": {"prod": "../../x"}}},
    ):
        with pytest.raises(CvmfsMlError, match="bad entry"):
            Index.from_bytes(json.dumps({**INDEX, "models": models}).encode())


DEEP = b'{"a":' * 20_000 + b"1" + b"}" * 20_000  # 200 kB; json.loads: RecursionError


def _safetensors_with(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize("what", [
    "webhook", "index.json", "OCI manifest", "meta-info", "safetensors header", "jsontext",
])  # fmt: skip
def test_deeply_nested_json_is_malformed_json(what: str) -> None:
    """Nesting too deep for Python's parser is a RecursionError, which no handler written for
    malformed JSON (ValueError) caught: it is malformed JSON like any other now."""
    import io

    from cvmfs_ml.cvmfs import jsontext
    from cvmfs_ml.cvmfs.meta import parse_metainfo
    from cvmfs_ml.models.formats import describe
    from cvmfs_ml.models.sources.oci_client import Fetched

    parse: dict[str, Callable[[], Any]] = {
        "webhook": lambda: parse_notification(DEEP),
        "index.json": lambda: Index.from_bytes(DEEP),
        "OCI manifest": lambda: Fetched(DEEP, "application/json", "sha256:" + "0" * 64).json(),
        "meta-info": lambda: parse_metainfo(DEEP),
        "safetensors header": lambda: describe(
            io.BytesIO(_safetensors_with(DEEP)), name="m.safetensors"
        ),
        "jsontext": lambda: jsontext.loads(DEEP),
    }
    expected = ValueError if what == "jsontext" else CvmfsMlError
    with pytest.raises(expected, match="nested too deeply"):
        parse[what]()
