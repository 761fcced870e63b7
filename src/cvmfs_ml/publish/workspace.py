"""The catalogs a transaction edits, and how they are committed bottom-up (§8.2, pitfall 7).

A :class:`CatalogWorkspace` opens private, decompressed copies of published catalogs on demand
(only the catalogs a change touches), creates new nested catalogs, and on :meth:`commit` finalises
every dirty catalog deepest first: counters, properties, compress, hash, store; then the parent's
``nested_catalogs`` row and mount point row are updated from the child, up to the root.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from cvmfs_ml.cvmfs.catalog import (
    COUNTERS,
    MARKER,
    Catalog,
    DirectoryEntry,
    Flag,
    NestedRef,
    WritableCatalog,
    parent_path,
    totals,
)
from cvmfs_ml.cvmfs.hashing import Algorithm, Digest
from cvmfs_ml.cvmfs.objects import Compression, ObjectKind, object_path
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.profile import StageClock
from cvmfs_ml.publish.streamed import stream_object
from cvmfs_ml.storage.base import ObjectStore

__all__ = ["CatalogWorkspace", "CommittedCatalog"]

_CATALOG_BLOCK = 2**20  # catalogs are compressed and stored as they are read


@dataclass
class _Open:
    """A catalog opened for writing, with what it was before the transaction."""

    writable: WritableCatalog
    previous: Digest | None  # None: created in this transaction
    revision: int
    old_counters: dict[str, int]
    delta: dict[str, int] = field(default_factory=dict)  # change of subtree_* from children
    parent: str | None = None


@dataclass(frozen=True)
class CommittedCatalog:
    digest: Digest
    size: int
    revision: int
    counters: dict[str, int]


class CatalogWorkspace:
    """Writable catalogs of one transaction, keyed by mount point (``""`` is the root)."""

    def __init__(self, store: ObjectStore, root: Digest | None, algorithm: Algorithm) -> None:
        self.store = store
        self.algorithm = algorithm
        self.root_digest = root
        self._dir = Path(tempfile.mkdtemp(prefix="catalogs.", dir=self._txn_dir()))
        self._open: dict[str, _Open] = {}
        self._readonly: dict[str, Catalog] = {}
        self._counter = 0
        self._unmarked: set[str] = set()  # catalog roots whose .cvmfscatalog was removed

    def _txn_dir(self) -> Path:
        return self.store.staging_dir()

    def _temp_path(self) -> Path:
        self._counter += 1
        return self._dir / f"catalog-{self._counter}.db"

    def close(self) -> None:
        for catalog in self._readonly.values():
            catalog.close()
        for item in self._open.values():
            item.writable.abort()
        self._open.clear()
        self._readonly.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def _materialise(self, digest: Digest) -> Path:
        path = self._temp_path()
        rel = object_path(digest, ObjectKind.CATALOG)
        with path.open("wb") as out:
            self.store.fetch_into(rel, digest, True, out)
        return path

    def readonly(self, mountpoint: str, digest: Digest) -> Catalog:
        """A published catalog for looking around (counters of a child being removed, ...)."""
        key = f"{mountpoint}@{digest.hex}"
        if key not in self._readonly:
            self._readonly[key] = Catalog(self._materialise(digest), mountpoint)
        return self._readonly[key]

    def _open_existing(self, mountpoint: str, digest: Digest, parent: str | None) -> _Open:
        published = self.readonly(mountpoint, digest)
        copy = self._temp_path()
        shutil.copyfile(published.file, copy)
        item = _Open(
            writable=WritableCatalog.open(copy, mountpoint),
            previous=digest,
            revision=published.revision,
            old_counters=published.statistics(),
            parent=parent,
        )
        self._open[mountpoint] = item
        return item

    def root(self) -> WritableCatalog:
        if "" not in self._open:
            if self.root_digest is None:
                raise PublishError("the repository has no root catalog; run 'repo create'")
            self._open_existing("", self.root_digest, None)
        return self._open[""].writable

    def replace_root(self, digest: Digest) -> None:
        """Start from another root catalog (rollback to a tag)."""
        for item in self._open.values():
            item.writable.abort()
        self._open.clear()
        previous, self.root_digest = self.root_digest, digest
        item = self._open_existing("", digest, None)
        published = self.readonly("", previous) if previous else None
        item.previous = previous
        if published is not None:
            item.revision = max(item.revision, published.revision)

    def catalog_for(self, path: str) -> WritableCatalog:
        """The writable catalog that holds ``path`` (the child, for a mount point itself).

        The walk starts at the deepest open catalog above ``path`` (the ancestors of an open
        catalog are open), found by looking its parent folders up, nearest first: scanning
        every open catalog at every level made publishing cubic in the nesting depth (800
        levels of nested catalogs took 37 s, 1500 over ten minutes).
        """
        current = self._deepest_open(path)
        while True:
            refs = current.nested_refs()
            ref = next((r for r in refs if path == r.path or path.startswith(r.path + "/")), None)
            if ref is None:
                return current
            current = self._open_existing(ref.path, ref.digest, current.mountpoint).writable

    def _deepest_open(self, path: str) -> WritableCatalog:
        prefix = path
        while prefix:
            item = self._open.get(prefix)
            if item is not None:
                return item.writable
            prefix = prefix[: prefix.rfind("/")]
        return self.root()

    # -- structure changes --------------------------------------------------------------------
    def create_nested(self, entry: DirectoryEntry) -> WritableCatalog:
        """Make ``entry.path`` the root of a new nested catalog (it must not exist yet)."""
        parent = self.catalog_for(entry.path)
        if parent.mountpoint == entry.path:
            return parent  # already a nested catalog root
        if parent.lookup(entry.path) is not None:
            raise PublishError(
                f"{entry.path} already exists as a plain directory; turning it into a nested "
                "catalog in place is not supported: remove it and publish it again"
            )
        parent.put(replace(entry, flags=int(Flag.DIR | Flag.NESTED_MOUNTPOINT)))
        child = WritableCatalog.create(self._temp_path(), entry, nested=True)
        self._open[entry.path] = _Open(child, None, 0, {}, parent=parent.mountpoint)
        return child

    def split(self, path: str) -> WritableCatalog:
        """Turn the plain directory ``path`` into the root of a new nested catalog.

        What upstream does when a ``.cvmfscatalog`` appears in an existing directory
        (catalog_rw.cc, Partition): the rows below move to the new catalog, the directory's row
        becomes a mount point, and nested catalogs below it are re-parented, their subtree
        counters moving with them.
        """
        parent = self.catalog_for(path)
        root_entry = parent.lookup(path)
        if root_entry is None or not root_entry.is_dir or parent.mountpoint == path:
            raise PublishError(f"{path} is not a plain directory; cannot make it a catalog root")
        owner = self._open[parent.mountpoint]
        child = WritableCatalog.create(self._temp_path(), root_entry, nested=True)
        item = _Open(child, None, 0, {}, parent=parent.mountpoint)
        # Nothing below yet (a marker met before the rest of its directory): nothing to move,
        # and no scan of the parent's nested catalogs (thousands of markers made it quadratic).
        if parent.has_children(path):
            for ref in parent.move_below(path, child):
                moved = totals(self.readonly(ref.path, ref.digest).statistics())
                self._subtract(owner, moved)
                for key, value in moved.items():
                    item.delta[key] = item.delta.get(key, 0) + value
            for mountpoint, other in self._open.items():
                if other.parent == parent.mountpoint and mountpoint.startswith(path + "/"):
                    other.parent = path
        parent.put(replace(root_entry, flags=int(Flag.DIR | Flag.NESTED_MOUNTPOINT)))
        self._open[path] = item
        return child

    def merge(self, path: str) -> None:
        """Fold the nested catalog at ``path`` back into its parent (its marker was removed).

        The inverse of :meth:`split`, as upstream does when a ``.cvmfscatalog`` is deleted: the
        rows move up, the mount point becomes a plain directory, and nested catalogs below are
        re-parented, their subtree counters moving with them.
        """
        child = self.catalog_for(path)
        if path == "" or child.mountpoint != path:
            raise PublishError(f"{path or '/'} is not a nested catalog root")
        item = self._open[path]
        owner = self._open[item.parent or ""]
        parent = owner.writable
        root_entry = child.lookup(path)
        assert root_entry is not None
        # Hard-link group ids are per catalog: the child's move past the parent's own.
        offset = parent.max_hardlink_group()
        for ref in child.move_below(path, parent, group_offset=offset):
            moved = totals(self.readonly(ref.path, ref.digest).statistics())
            for key, value in moved.items():
                owner.delta[key] = owner.delta.get(key, 0) + value
        if item.previous is not None:  # its published totals leave the parent's subtree
            self._subtract(owner, item.old_counters)
        for other in self._open.values():
            if other.parent == path:
                other.parent = parent.mountpoint
        parent.drop_nested(path)
        parent.put(replace(root_entry, flags=int(Flag.DIR)))
        parent.dirty_dirs.add(path)  # its link count now comes from rows in this catalog
        del self._open[path]
        child.abort()

    def remove(self, path: str) -> None:
        """Remove ``path`` and everything below, nested catalogs included."""
        if path.endswith("/" + MARKER):
            self._unmarked.add(parent_path(path))
        catalog = self.catalog_for(path)
        if catalog.mountpoint == path and path != "":
            # A whole nested catalog: drop its mount point row and reference from the parent.
            item = self._open.pop(path)
            item.writable.abort()
            parent = self._open[item.parent or ""]
            parent.writable.remove(path)
            if item.previous is not None:
                self._subtract(parent, item.old_counters)
        else:
            owner = self._open[catalog.mountpoint]
            for ref in catalog.remove(path):
                self._subtract(owner, self.readonly(ref.path, ref.digest).statistics())
        # Catalogs below the removed path vanish with it; their counters were part of the
        # published totals subtracted above (or never counted, if created in this transaction).
        for mountpoint in [m for m in self._open if m.startswith(path + "/")]:
            self._open.pop(mountpoint).writable.abort()

    @staticmethod
    def _subtract(item: _Open, counters: dict[str, int]) -> None:
        for key, value in totals(counters).items():
            item.delta[key] = item.delta.get(key, 0) - value

    # -- commit -------------------------------------------------------------------------------
    def commit(self, *, now: int, ttl: int) -> CommittedCatalog:
        """Finalise and store every dirty catalog, deepest first; returns the new root."""
        self.root()
        for path in sorted(self._unmarked, key=lambda m: (-m.count("/"), m)):
            catalog = self.catalog_for(path)
            if path and catalog.mountpoint == path and catalog.lookup(f"{path}/{MARKER}") is None:
                self.merge(path)
        self._unmarked.clear()
        for mountpoint in sorted(self._open, key=lambda m: (-m.count("/"), m)):
            if mountpoint == "":
                continue
            item = self._open[mountpoint]
            committed, root_entry = self._finalise(mountpoint, item, now=now, ttl=None)
            parent = self._open[item.parent or ""]
            parent.writable.set_nested(NestedRef(mountpoint, committed.digest, committed.size))
            # Pitfall 7: the mount point row mirrors the child's root row, flags 3 vs 33.
            flags = (root_entry.flags & ~Flag.NESTED_ROOT) | Flag.NESTED_MOUNTPOINT
            parent.writable.put(replace(root_entry, flags=int(flags)))
            new_totals = totals(committed.counters)
            old_totals = totals(item.old_counters) if item.previous is not None else {}
            for key, value in new_totals.items():
                parent.delta[key] = parent.delta.get(key, 0) + value - old_totals.get(key, 0)
        committed, _ = self._finalise("", self._open[""], now=now, ttl=ttl)
        return committed

    def _finalise(
        self, mountpoint: str, item: _Open, *, now: int, ttl: int | None
    ) -> tuple[CommittedCatalog, DirectoryEntry]:
        writable = item.writable
        writable.fix_linkcounts()
        root_entry = writable.lookup(mountpoint)
        if root_entry is None:
            raise PublishError(f"catalog {mountpoint or '/'} lost its root entry")
        subtree = {
            key: item.old_counters.get(key, 0) + item.delta.get(key, 0)
            for key in COUNTERS
            if key.startswith("subtree_")
        }
        revision = item.revision + 1
        counters = writable.finalize(
            revision=revision,
            last_modified=now,
            previous_revision=item.previous,
            subtree=subtree,
            ttl=ttl,
        )
        with writable.file.open("rb") as handle:
            blocks = iter(lambda: handle.read(_CATALOG_BLOCK), b"")
            digest, _, size, _ = stream_object(
                self.store, blocks, Compression.ZLIB, self.algorithm, ObjectKind.CATALOG,
                StageClock(),
            )  # fmt: skip
        del self._open[mountpoint]
        return CommittedCatalog(digest, size, revision, counters), root_entry
