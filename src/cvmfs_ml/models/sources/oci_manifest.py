"""OCI manifests: the media types and annotations models use, and one reference resolved
to the manifest an ingest or a sync is about (:func:`resolve`), classified by kind
(:func:`classify`). Downloading and laying out the blobs is :mod:`cvmfs_ml.models.sources.oci`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cvmfs_ml.errors import FormatError, NotFoundError
from cvmfs_ml.models.sources.oci_client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    OciReference,
    RegistryClient,
    check_digest,
)

__all__ = [
    "ANY_DIGEST_RE",
    "ANNOTATION_FILEPATH",
    "ANNOTATION_FILE_METADATA",
    "ANNOTATION_TITLE",
    "ANNOTATION_UNPACK",
    "FOREIGN_LAYERS",
    "IMAGE_CONFIGS",
    "KITOPS_CONFIG",
    "KITOPS_PREFIX",
    "MODELPACK_ARTIFACT",
    "MODELPACK_CONFIG",
    "MODELPACK_PREFIX",
    "ORAS_DIRECTORY_LAYER",
    "ResolvedManifest",
    "check_index",
    "check_manifest",
    "classify",
    "resolve",
]

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_UNPACK = "io.deis.oras.content.unpack"
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"

MODELPACK_PREFIX = "application/vnd.cncf.model."
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
KITOPS_PREFIX = "application/vnd.kitops.modelkit."
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
IMAGE_CONFIGS = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
ORAS_DIRECTORY_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FOREIGN_LAYERS = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


@dataclass
class ResolvedManifest:
    """The one manifest an ingest is about, and how it was reached."""

    reference: OciReference
    manifest: dict[str, Any]
    digest: str
    media_type: str
    index_digest: str | None = None

    @property
    def kind(self) -> str:
        return classify(self.manifest)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers") or [])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config") or {})


# -- resolve ---------------------------------------------------------------------------------------
def _platform_matches(entry: dict[str, Any], platform: str) -> bool:
    wanted = platform.split("/")
    found = entry.get("platform") or {}
    if not isinstance(found, dict):
        return False
    have = [found.get("os", ""), found.get("architecture", ""), found.get("variant", "")]
    return all(w == h for w, h in zip(wanted, have, strict=False))


def resolve(
    client: RegistryClient, reference: OciReference, *, platform: str = "linux/amd64"
) -> ResolvedManifest:
    """Fetch the manifest of ``reference``; an index is narrowed to ``platform``.

    Index entries without a platform (artifact indexes) match any platform; the first match wins.
    """
    fetched = client.get_manifest(reference.repository, reference.reference)
    document = fetched.json()
    media_type = fetched.media_type or str(document.get("mediaType") or "")
    index_digest = None
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST) or (
        not media_type and "manifests" in document
    ):
        index_digest = fetched.digest
        check_index(document, f"image index {fetched.digest}")
        candidates = [
            m
            for m in document.get("manifests") or []
            if isinstance(m, dict) and (not m.get("platform") or _platform_matches(m, platform))
        ]
        if not candidates:
            raise NotFoundError(f"{reference} for platform {platform}", "image index")
        child = candidates[0]
        digest = check_digest(str(child.get("digest", "")))
        fetched = client.get_manifest(reference.repository, digest)
        document = fetched.json()
        media_type = fetched.media_type or str(child.get("mediaType") or "")
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST) and "layers" not in document:
        raise FormatError(f"manifest {fetched.digest}", f"unsupported media type {media_type!r}")
    check_manifest(document, f"manifest {fetched.digest}")
    return ResolvedManifest(
        reference, document, fetched.digest, media_type or OCI_MANIFEST, index_digest
    )


def _strings(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{1,256}")
"""A digest of any algorithm (image-spec ``descriptor.md``): no room for a line break that
would end up in a response header (``OCI-Subject``) or a file name."""


def _descriptor_problem(value: Any) -> str | None:
    """What is wrong with a descriptor (image-spec ``descriptor.md``), or None."""
    if not isinstance(value, dict):
        return "is not an object"
    for key in ("mediaType", "artifactType"):
        if not isinstance(value.get(key, ""), str):
            return f"has a {key} that is not a string"
    digest = value.get("digest")
    if not isinstance(digest, str) or not ANY_DIGEST_RE.fullmatch(digest):
        return "has no digest (algorithm:encoded)"
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "has no size (a non-negative integer)"
    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        return "has urls that are not a list of strings"
    if "annotations" in value and not _strings(value["annotations"]):
        return "has annotations that are not strings"
    if not isinstance(value.get("platform", {}), dict):
        return "has a platform that is not an object"
    return None


def check_manifest(document: dict[str, Any], what: str) -> None:
    """Refuse a manifest whose structure is not the spec's: a registry (or a pusher) is not
    trusted, and everything after this (classify, the layout, the sync's records, the
    registry's store and headers) reads these fields. Indexes get this check too: their
    ``config`` and ``layers`` are not the spec's, but they are read like a manifest's."""
    for key in ("mediaType", "artifactType"):
        if not isinstance(document.get(key, ""), str):
            raise FormatError(what, f"'{key}' is not a string")
    if "annotations" in document and not _strings(document["annotations"]):
        raise FormatError(what, "'annotations' are not strings")
    for key in ("config", "subject"):
        problem = _descriptor_problem(document[key]) if key in document else None
        if problem:
            raise FormatError(what, f"{key} {problem}")
    layers = document.get("layers", [])
    if not isinstance(layers, list):
        raise FormatError(what, "'layers' is not a list")
    for index, layer in enumerate(layers):
        problem = _descriptor_problem(layer)
        if problem:
            raise FormatError(what, f"layer {index} {problem}")


def check_index(document: dict[str, Any], what: str) -> None:
    """Refuse an image index whose ``manifests`` are not a list of descriptors, or whose other
    fields fail :func:`check_manifest`."""
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise FormatError(what, "'manifests' is not a list")
    for index, entry in enumerate(manifests):
        problem = _descriptor_problem(entry)
        if problem:
            raise FormatError(what, f"manifest {index} {problem}")
    check_manifest(document, what)


def classify(manifest: dict[str, Any]) -> str:
    """``"modelpack"``, ``"kitops"``, ``"image"`` or ``"artifact"`` (see the module docs)."""
    config_type = str((manifest.get("config") or {}).get("mediaType", ""))
    layer_types = [str(layer.get("mediaType", "")) for layer in manifest.get("layers") or []]
    if (
        manifest.get("artifactType") == MODELPACK_ARTIFACT
        or config_type.startswith(MODELPACK_PREFIX)
        or any(t.startswith(MODELPACK_PREFIX) for t in layer_types)
    ):
        return "modelpack"
    if config_type.startswith(KITOPS_PREFIX) or any(
        t.startswith(KITOPS_PREFIX) for t in layer_types
    ):
        return "kitops"
    titled = any(
        ANNOTATION_TITLE in (layer.get("annotations") or {})
        for layer in manifest.get("layers") or []
    )
    if config_type in IMAGE_CONFIGS and not titled:
        return "image"
    return "artifact"
