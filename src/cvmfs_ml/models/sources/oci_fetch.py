"""Fetching an OCI manifest's blobs: each checked against its digest and size, in parallel as
DUCC does, into a digest-addressed folder (``<blob_dir>/sha256/<hex>``) where blobs already
there are not fetched again; a large artifact layer that will be one file is stored as the
repository's objects while it downloads (:class:`~cvmfs_ml.models.sources.blob_ingest.BlobIngest`).
What the blobs become is :mod:`cvmfs_ml.models.sources.oci`'s part.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cvmfs_ml.client.transfer import Cancellation
from cvmfs_ml.errors import FormatError
from cvmfs_ml.models.sources.blob_ingest import BlobIngest
from cvmfs_ml.models.sources.oci_client import RegistryClient, check_digest
from cvmfs_ml.models.sources.oci_manifest import (
    ANNOTATION_TITLE,
    ANNOTATION_UNPACK,
    FOREIGN_LAYERS,
    ORAS_DIRECTORY_LAYER,
    ResolvedManifest,
)

__all__ = [
    "distributable_layers",
    "fetch_descriptor",
    "fetch_layer",
    "fetch_layers",
    "fetched_blob",
    "is_foreign",
    "is_tar_type",
    "may_be_a_file",
]

_TAR_SUFFIXES = (".tar", ".tar+gzip", ".tar+zstd", ".tar.gzip", ".tar.gz")


def fetched_blob(blob_dir: Path, digest: str) -> Path:
    """Where :func:`fetch_layers` keeps blob ``digest`` in ``blob_dir``."""
    algorithm, hexdigest = check_digest(digest).split(":", 1)
    return blob_dir / algorithm / hexdigest


def _blob_path(blob_dir: Path, digest: str) -> Path:
    algorithm, hexdigest = check_digest(digest).split(":", 1)
    folder = blob_dir / algorithm
    folder.mkdir(parents=True, exist_ok=True)
    return folder / hexdigest


def fetch_descriptor(
    client: RegistryClient,
    resolved: ResolvedManifest,
    descriptor: dict[str, Any],
    blob_dir: Path,
    ingest: BlobIngest | None = None,
    cancel: Cancellation | None = None,
) -> Path:
    """The blob ``descriptor`` names, verified, in ``blob_dir`` (kept if already there);
    through ``ingest`` where it will be one large file, stopped by ``cancel``."""
    digest, repository = str(descriptor.get("digest", "")), resolved.reference.repository
    size = descriptor.get("size") if isinstance(descriptor.get("size"), int) else None
    dest = _blob_path(blob_dir, digest)
    if (
        ingest is not None
        and ingest.wants(size)
        and may_be_a_file(descriptor, resolved.kind)
        and not dest.exists()
    ):
        assert size is not None  # wants() says so
        fetched = ingest.fetch(client, repository, digest, size, dest, cancel)
        if fetched is not None:
            return fetched
    return client.fetch_blob(repository, digest, dest, size=size, cancel=cancel)


def is_foreign(layer: dict[str, Any], kind: str) -> bool:
    """Foreign / non-distributable layers live elsewhere (DUCC skips them too)."""
    return str(layer.get("mediaType", "")) in FOREIGN_LAYERS or (
        kind == "image" and bool(layer.get("urls"))
    )


def may_be_a_file(layer: dict[str, Any], kind: str) -> bool:
    """Whether an artifact's layer will be laid out as one file, as far as the manifest tells
    (``models.sources.oci._place_artifact_layer`` decides; a wrong guess only costs work)."""
    media_type = str(layer.get("mediaType", ""))
    annotations = layer.get("annotations") or {}
    if kind == "image" or media_type == ORAS_DIRECTORY_LAYER:
        return False
    if str(annotations.get(ANNOTATION_UNPACK, "")).lower() == "true":
        return False
    if kind in ("modelpack", "kitops") or not annotations.get(ANNOTATION_TITLE):
        return not is_tar_type(media_type) and ".tar" not in media_type
    return True  # a titled layer is a file, whatever its media type claims (oras-py's do)


def _fetch_all(
    client: RegistryClient,
    resolved: ResolvedManifest,
    layers: list[dict[str, Any]],
    blob_dir: Path,
    workers: int,
    ingest: BlobIngest | None = None,
) -> dict[str, Path]:
    """Download ``layers`` in parallel (as DUCC does); ``{digest: verified blob file}``."""
    if workers <= 1 or len(layers) <= 1:
        return {
            str(layer["digest"]): fetch_descriptor(client, resolved, layer, blob_dir, ingest)
            for layer in layers
        }
    # A failed layer or SIGTERM cancels the downloads: the pool's shutdown waits for them.
    with (
        ThreadPoolExecutor(min(workers, len(layers)), thread_name_prefix="oci-blob") as pool,
        Cancellation() as cancel,
    ):
        futures = {
            str(layer["digest"]): pool.submit(
                fetch_descriptor, client, resolved, layer, blob_dir, ingest, cancel
            )
            for layer in layers
        }
        return {digest: future.result() for digest, future in futures.items()}


def distributable_layers(resolved: ResolvedManifest) -> list[dict[str, Any]]:
    """The layers of ``resolved`` in order, without foreign ones (their digests checked)."""
    kind = resolved.kind
    out = []
    for position, layer in enumerate(resolved.layers):
        if not isinstance(layer, dict) or "digest" not in layer:
            raise FormatError(f"manifest {resolved.digest}", f"layer {position} has no digest")
        check_digest(str(layer["digest"]))
        if not is_foreign(layer, kind):
            out.append(layer)
    return out


def fetch_layer(
    client: RegistryClient,
    resolved: ResolvedManifest,
    layer: dict[str, Any],
    blob_dir: Path,
    cancel: Cancellation | None = None,
) -> Path:
    """One layer, verified, in ``blob_dir`` (kept if already there); ``cancel`` stops it."""
    return fetch_descriptor(client, resolved, layer, blob_dir, cancel=cancel)


def fetch_layers(
    client: RegistryClient,
    resolved: ResolvedManifest,
    blob_dir: Path,
    *,
    workers: int = 4,
    ingest: BlobIngest | None = None,
) -> dict[str, Path]:
    """Every distributable layer of ``resolved``, verified, in ``blob_dir`` (by digest).

    Blobs already in ``blob_dir`` are not downloaded again: layers shared by images are fetched
    once. With ``ingest``, a large artifact layer is stored as objects while it downloads.
    """
    wanted: dict[str, dict[str, Any]] = {}
    for layer in distributable_layers(resolved):
        wanted.setdefault(str(layer["digest"]), layer)
    return _fetch_all(client, resolved, list(wanted.values()), blob_dir, workers, ingest)


def is_tar_type(media_type: str) -> bool:
    return media_type.endswith(_TAR_SUFFIXES) or media_type in (
        "application/x-tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    )
