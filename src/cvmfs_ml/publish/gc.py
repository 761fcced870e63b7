"""Garbage collection: delete objects that no kept revision references.

Kept: the current revision, every named tag (``trunk-previous`` included) and the objects the
manifest names (certificate, history, meta-info). Everything else under ``data/`` goes. It runs
under the publisher lock, so no transaction writes objects while the sweep decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from cvmfs_ml.cvmfs.catalog import Catalog, referenced_objects, walk_catalog_tree
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path
from cvmfs_ml.errors import NotFoundError, PublishError
from cvmfs_ml.publish.repository import Publisher
from cvmfs_ml.storage.info import STATUS_JSON, date_utc, updated_status

__all__ = ["GcProgress", "GcReport", "collect_garbage"]


@dataclass(frozen=True)
class GcReport:
    kept: int
    removed: int
    bytes_removed: int
    dry_run: bool
    bytes_kept: int = 0
    older_tags: tuple[tuple[str, int], ...] = ()
    """(name, revision) of tags that keep an older tree, and so its data, alive."""


@dataclass
class GcProgress:
    """Live counters of a running collection, for progress bars that poll them."""

    catalogs: int = 0
    objects_listed: int = 0
    bytes_listed: int = 0


def collect_garbage(
    publisher: Publisher, *, dry_run: bool = False, progress: GcProgress | None = None
) -> GcReport:
    if not publisher.settings.garbage_collection:
        raise PublishError(
            f"{publisher.fqrn} is not garbage-collectable (CVMFS_GARBAGE_COLLECTION=false)"
        )
    store = publisher.store
    progress = progress if progress is not None else GcProgress()
    # Nothing here writes to the disk before the deleting is done: the lock's recovery deletes
    # staging leftovers first, and catalogs and history are read into memory, so gc works on
    # the full disk it is meant to relieve (issue 9).
    with publisher.lock():
        manifest = publisher.manifest()
        tags = publisher.tags()
        roots = {manifest.catalog}
        roots |= {tag.root_catalog for tag in tags}
        older_tags = tuple(
            sorted(
                {(t.name, t.revision) for t in tags if t.root_catalog != manifest.catalog},
                key=lambda item: (item[1], item[0]),
            )
        )
        keep: set[str] = set()
        for digest, kind in (
            (manifest.certificate, ObjectKind.CERTIFICATE),
            (manifest.history, ObjectKind.HISTORY),
            (manifest.metainfo, ObjectKind.METAINFO),
        ):
            if digest is not None:
                keep.add(object_path(digest, kind))

        def load(mountpoint: str, digest: Digest) -> Catalog:
            raw = store.fetch(object_path(digest, ObjectKind.CATALOG), digest, compressed=True)
            return Catalog(f"{digest.hex}.db", mountpoint, raw=raw)

        # One catalog in memory at a time: each is closed once read (holding every one until
        # the end made gc's memory the size of all catalogs of all kept revisions).
        seen: set[Digest] = set()
        for root in roots:
            for _mountpoint, digest, catalog in walk_catalog_tree(root, load, seen):
                with catalog:
                    progress.catalogs += 1
                    keep.add(object_path(digest, ObjectKind.CATALOG))
                    for obj, is_chunk, _compressed in referenced_objects(catalog):
                        kind = ObjectKind.PARTIAL if is_chunk else ObjectKind.FILE
                        keep.add(object_path(obj, kind))
        doomed: list[str] = []
        bytes_removed = bytes_kept = 0
        for rel, size in store.list_sizes():
            progress.objects_listed += 1
            progress.bytes_listed += size
            if rel in keep:
                bytes_kept += size
            else:
                doomed.append(rel)
                bytes_removed += size
        if not dry_run:
            store.remove_many(doomed)
            # what cvmfs_server gc records for monitors (update_repo_status)
            try:
                existing: bytes | None = store.get_bytes(STATUS_JSON)
            except NotFoundError:
                existing = None
            store.put_bytes(STATUS_JSON, updated_status(existing, last_gc=date_utc()))
        return GcReport(len(keep), len(doomed), bytes_removed, dry_run, bytes_kept, older_tags)
