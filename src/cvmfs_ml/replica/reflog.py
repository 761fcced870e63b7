"""The replica's own ``.cvmfsreflog`` (every root object it holds), rebuilt when damaged.

A Stratum 1 keeps a reflog as its Stratum 0 does: garbage collection of the replica starts from
it. A reflog that no longer opens (emptied by a disk, cut short, edited by hand) would stop every
snapshot just before its manifest, so it is rebuilt from the catalog and history chains the
replica holds (:func:`~cvmfs_ml.storage.reflog_repair.reachable_references`, upstream's
``reconstruct_reflog``) and the snapshot goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.reflog import Reflog, RefType
from cvmfs_ml.errors import SQLITE_DAMAGE, FormatError

__all__ = ["root_refs", "updated_reflog"]

Refs = Iterable[tuple[Digest, RefType]]


def root_refs(manifest: Manifest, catalogs: Iterable[Digest]) -> list[tuple[Digest, RefType]]:
    """What a snapshot adds to the reflog: the catalogs it copied, and the manifest's objects."""
    refs = [(digest, RefType.CATALOG) for digest in {*catalogs, manifest.catalog}]
    for digest, kind in (
        (manifest.certificate, RefType.CERTIFICATE),
        (manifest.history, RefType.HISTORY),
        (manifest.metainfo, RefType.METAINFO),
    ):
        if digest is not None:
            refs.append((digest, kind))
    return refs


def updated_reflog(
    tmp: Path, existing: bytes | None, fqrn: str, refs: Refs, rebuild: Callable[[], Refs]
) -> bool:
    """Write to ``tmp`` the reflog ``existing`` (a new one when None) with ``refs`` added, or,
    when ``existing`` does not open, a new one holding ``rebuild()`` and ``refs``. Returns
    whether it was rebuilt."""
    refs = list(refs)
    try:
        _write(tmp, existing, fqrn, refs)
        return False
    except (FormatError, *SQLITE_DAMAGE):
        if existing is None:
            raise
    tmp.unlink(missing_ok=True)
    _write(tmp, None, fqrn, [*rebuild(), *refs])
    return True


def _write(tmp: Path, existing: bytes | None, fqrn: str, refs: Refs) -> None:
    if existing is not None:
        tmp.write_bytes(existing)
        reflog = Reflog.open(tmp, writable=True)
    else:
        reflog = Reflog.create(tmp, fqrn)
    with reflog:
        for digest, kind in refs:
            reflog.add(digest, kind)
