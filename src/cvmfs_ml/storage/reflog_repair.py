"""Rebuilding a damaged or lost ``.cvmfsreflog`` from what the repository still holds.

The reflog lists every root catalog, history, certificate and meta-info object ever published
(:mod:`cvmfs_ml.cvmfs.reflog`); a publish appends to it, so a reflog that no longer opens (a bad
copy, a disk error, a hand edit) stops every publish. Upstream repairs it with ``cvmfs_server
check -r``, which runs ``cvmfs_swissknife reconstruct_reflog``: "bootstraps a Reference Log
from Catalog and History chains". This does the same walk:

* root catalogs: the current one and every tag's, each followed back through its
  ``previous_revision`` property until an object is missing (garbage collection removed it);
* histories: the current one, followed back through its own ``previous_revision``;
* the certificate and meta-info the manifest names.

References to objects that garbage collection already removed are lost with them, which is
what the reflog would say about them anyway: nothing can replicate or collect them any more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cvmfs_ml.cvmfs.catalog import Catalog
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.history import HistoryDb
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.cvmfs.reflog import RefType
from cvmfs_ml.errors import CvmfsMlError
from cvmfs_ml.storage.base import ObjectStore

__all__ = ["reachable_references"]


def _chain(start: Iterable[Digest], previous: Callable[[Digest], Digest | None]) -> list[Digest]:
    """``start`` and everything reachable back through ``previous``, each once, in order."""
    found: list[Digest] = []
    seen: set[Digest] = set()
    for first in start:
        digest: Digest | None = first
        while digest is not None and digest not in seen:
            seen.add(digest)
            found.append(digest)
            digest = previous(digest)
    return found


def reachable_references(
    store: ObjectStore, manifest: Manifest, tag_roots: Iterable[Digest]
) -> list[tuple[Digest, RefType]]:
    """Every reference a rebuilt reflog should hold, oldest object kinds last."""

    def fetch(digest: Digest, kind: ObjectKind) -> bytes | None:
        try:
            return store.fetch(object_path(digest, kind), digest, compressed=True)
        except (CvmfsMlError, OSError):  # removed by gc, or damaged: the chain ends here
            return None

    def previous_catalog(digest: Digest) -> Digest | None:
        raw = fetch(digest, ObjectKind.CATALOG)
        if raw is None:
            return None
        catalog = Catalog(f"{digest.hex}.db", "", raw=raw)
        try:
            return catalog.previous_revision
        finally:
            catalog.close()

    def previous_history(digest: Digest) -> Digest | None:
        raw = fetch(digest, ObjectKind.HISTORY)
        if raw is None:
            return None
        with HistoryDb.from_bytes(raw, f"history {digest.hex}") as history:
            return history.previous_revision

    refs = [(d, RefType.CATALOG)
            for d in _chain([manifest.catalog, *tag_roots], previous_catalog)]  # fmt: skip
    if manifest.history is not None:
        refs += [(d, RefType.HISTORY) for d in _chain([manifest.history], previous_history)]
    if manifest.certificate is not None:
        refs.append((manifest.certificate, RefType.CERTIFICATE))
    if manifest.metainfo is not None:
        refs.append((manifest.metainfo, RefType.METAINFO))
    return refs
