"""Publish one container image at once, in DUCC's layout: what a push to our registry does.

The registry's ``/v2/`` endpoint hands a pushed image here instead of to the models layer, so a
pushed image and a synced one land the same way (:mod:`cvmfs_ml.sync.images`, one unpacker):
``/.flat/<c[0:2]>/<c>/`` (``c`` the config digest), the public link
``/<registry>/<repository>:<tag>`` and ``/.metadata/...``. An image whose config digest is
already flattened only moves its link; the same manifest again publishes nothing. The sync lock
is held throughout, so a sync round sharing the repository never removes a flat this push
links to (its orphan check and this publish do not interleave).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import FormatError, PublishError
from cvmfs_ml.models.layout import utc_timestamp
from cvmfs_ml.models.publish import open_published
from cvmfs_ml.models.sources.oci import resolve
from cvmfs_ml.models.sources.oci_client import OciReference
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.sync.engine import sync_lock
from cvmfs_ml.sync.images import (
    IMAGE_JSON,
    ImageRecord,
    flat_path,
    metadata_folder,
    public_path,
    queue_image,
    read_image_record,
    unpack_flat,
)
from cvmfs_ml.sync.scratch import round_scratch

__all__ = ["PUSH_OWNER", "PushedImage", "publish_image"]

#: ``image.json``'s ``owner`` of pushed images: no wishlist owns them, so no sync removes them.
PUSH_OWNER = "registry-push"


@dataclass
class PushedImage:
    public_path: str
    flat: str
    revision: int
    changed: bool  # False: the same manifest was already published there


def publish_image(
    publisher: Publisher,
    client: Any,
    reference: OciReference,
    *,
    public_registry: str,
    scratch: Path | None = None,
    max_bytes: int = 16 * 2**30,
) -> PushedImage:
    """Unpack and publish the image ``reference`` (read through ``client``) as DUCC would.

    ``public_registry`` is the ``<registry>`` of the public link (the name users pull with).
    Raises on anything hostile or broken, with nothing published.
    """
    if reference.tag is None:
        raise PublishError(f"{reference}: a pushed image needs a tag for its public link")
    with sync_lock(publisher):
        resolved = resolve(client, reference)
        if resolved.kind != "image":
            raise PublishError(f"{reference} is a {resolved.kind}, not a container image")
        config = str(resolved.config.get("digest", ""))
        target = flat_path(config)
        public = public_path(public_registry, reference.repository, reference.tag)
        meta = metadata_folder(public_registry, reference.repository, reference.tag)
        with open_published(publisher) as repo:
            have_flat = repo.exists(target)
            try:
                old = read_image_record(repo, f"{meta}/{IMAGE_JSON}")
            except (FileNotFoundError, NotADirectoryError, FormatError):
                old = None  # none, or one sync does not write: the image is published again
            linked = repo.exists(public)
        if old is not None and old.manifest_digest == resolved.digest and linked and have_flat:
            revision = publisher.manifest().revision
            return PushedImage(public, target, revision, changed=False)
        declared = sum(int(layer.get("size") or 0) for layer in resolved.layers)
        if declared > max_bytes:
            raise PublishError(
                f"{reference} declares {declared} bytes of layers (limit {max_bytes})"
            )
        manifest = client.get_manifest(reference.repository, resolved.digest).data
        with round_scratch(scratch) as tmp:  # what a killed push left goes first
            flat = None
            size = old.size_bytes if old is not None and old.flat == target else 0
            if not have_flat:
                flat = unpack_flat(client, resolved, tmp / "flat", tmp / "blobs")
                size = flat.size_bytes
            record = ImageRecord(
                owner=PUSH_OWNER,
                image=f"{public_registry}/{reference.repository}:{reference.tag}",
                registry=public_registry,
                repository=reference.repository,
                tag=reference.tag,
                manifest_digest=resolved.digest,
                config_digest=config,
                flat=target,
                size_bytes=size,
                synced=utc_timestamp(),
            )
            with publisher.transaction() as txn:
                queue_image(txn, record, manifest, flat, replace_link=True)
                result = txn.commit(description=f"cvmfs-ml registry: image {record.image}")
        return PushedImage(public, target, result.revision, changed=True)
