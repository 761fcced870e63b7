"""The OCI store served to the models layer without HTTP: what
:func:`~cvmfs_ml.models.sources.oci.ingest_oci` and the image unpacker need from a registry,
read from this registry's own :class:`~cvmfs_ml.registry.oci_store.OciStore`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cvmfs_ml.errors import NotFoundError
from cvmfs_ml.models.sources.oci_client import Fetched
from cvmfs_ml.registry.oci_store import OciError, OciStore

__all__ = ["LocalRegistryClient"]


class LocalRegistryClient:
    """What :func:`~cvmfs_ml.models.sources.oci.ingest_oci` needs from a registry, served
    from this store: the models layer publishes a pushed artifact without an HTTP round trip."""

    registry = "localhost"

    def __init__(self, store: OciStore) -> None:
        self.store = store

    def get_manifest(self, repository: str, reference: str, accept: Any = None) -> Fetched:
        try:
            found = self.store.resolve(repository, reference)
        except OciError as exc:
            raise NotFoundError(f"{repository}:{reference}", "registry") from exc
        return Fetched(found.read(), found.media_type, found.digest)

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        *,
        size: int | None = None,
        cancel: Any = None,  # the HTTP client's Cancellation: nothing to stop in a local link
    ) -> Path:
        source = self.store.blob_path(digest)
        if not self.store.holds(repository, digest):
            raise NotFoundError(f"blob {digest}", repository)
        dest = Path(dest)
        if dest.exists():
            return dest
        try:
            os.link(source, dest)  # blobs are immutable: a second name costs nothing
        except OSError:
            shutil.copyfile(source, dest)
        return dest

    def close(self) -> None:
        pass
