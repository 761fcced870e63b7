"""Edits to the tree of a transaction: entries put where they belong, or refused with a reason.

Every edit keeps the tree a tree: an entry's parent is a directory (a new one is created with mode
0755 when missing, as ``cvmfs_server ingest`` does), never a file or a symlink; putting a row
below a non-directory would leave rows no client can reach and ``repo check`` would report them.
Hard-link groups get an id per catalog (catalog_mgr_rw.cc, AddHardlinkGroup: the next after the
highest in the catalog) and every member the group's link count.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field, replace

from cvmfs_ml.cvmfs.catalog import DirectoryEntry, parent_path
from cvmfs_ml.errors import PublishError
from cvmfs_ml.publish.archive import check_name_limits
from cvmfs_ml.publish.ingest import FileContent, PendingFile
from cvmfs_ml.publish.sources import SourceItem
from cvmfs_ml.publish.workspace import CatalogWorkspace

__all__ = ["TreeEditor", "describe", "lookup"]


def lookup(workspace: CatalogWorkspace, path: str) -> DirectoryEntry | None:
    return workspace.catalog_for(path).lookup(path)


def describe(entry: DirectoryEntry) -> str:
    if entry.is_dir:
        return "directory"
    if entry.is_symlink:
        return f"symlink (-> {entry.symlink})"
    if entry.is_regular:
        return "file"
    return "special file"


@dataclass
class TreeEditor:
    """Puts :class:`SourceItem` values into a workspace, checking parents and linking groups."""

    workspace: CatalogWorkspace
    _directories: set[str] = field(default_factory=set)  # known to be directories now
    _groups: dict[tuple[str, str], int] = field(default_factory=dict)

    def ensure_parents(self, path: str) -> None:
        """Create missing parents of ``path``; refuse when one of them is not a directory."""
        missing = []
        parent = parent_path(path) if path else None
        while parent is not None and parent not in self._directories:
            entry = lookup(self.workspace, parent)
            if entry is not None:
                if not entry.is_dir:
                    raise PublishError(
                        f"cannot add {path}: {parent} is a {describe(entry)}, not a directory; "
                        "remove it first ('repo rm') or choose another path"
                    )
                break
            missing.append(parent)
            parent = parent_path(parent) if parent else None
        self._directories.update(p for p in (parent,) if p is not None)
        now = int(time.time())
        for directory in reversed(missing):
            entry = DirectoryEntry(
                path=directory,
                mode=stat.S_IFDIR | 0o755,
                size=4096,
                mtime=now,
                hardlinks=2,
                flags=1,
            )
            self.workspace.catalog_for(directory).put(entry)
            self._directories.add(directory)

    def put(
        self,
        item: SourceItem,
        pending: PendingFile | None,
        *,
        nested_root: bool,
        content: FileContent | None = None,
    ) -> None:
        """Put one item (its parent must exist or be creatable); replaces a non-directory."""
        workspace = self.workspace
        path = item.path
        check_name_limits(path, path)  # every source, not only folders and tarballs
        self.ensure_parents(path)
        catalog = workspace.catalog_for(path)
        existing = catalog.lookup(path)
        if existing is not None and not (existing.is_dir and item.is_dir):
            if path == "":
                raise PublishError("the repository root must stay a directory")
            workspace.remove(path)
            self._directories -= {
                d for d in self._directories if d == path or d.startswith(path + "/")
            }
            catalog = workspace.catalog_for(path)
            existing = None
        if content is None and pending is not None:
            content = pending.result()
        entry = DirectoryEntry(
            path=path,
            mode=item.mode,
            size=item.rdev if (item.rdev and not item.is_dir) else item.size,
            mtime=item.mtime,
            uid=item.uid,
            gid=item.gid,
            symlink=item.symlink,
            xattrs=item.xattrs,
            hardlinks=2 if item.is_dir else self._hardlinks(catalog.mountpoint, item),
        )
        if content is not None:
            entry = replace(
                entry,
                size=content.size,
                digest=content.digest,
                flags=DirectoryEntry.make_flags(
                    item.mode,
                    chunked=content.is_chunked,
                    compressed=content.compressed,
                    algorithm=workspace.algorithm,
                    has_hash=content.digest is not None,
                ),
            )
        else:
            entry = replace(entry, flags=DirectoryEntry.make_flags(item.mode))
        if item.is_dir:
            self._directories.add(path)
        if existing is not None:  # a directory that stays: keep its flags and link count
            catalog.put(replace(entry, flags=existing.flags, hardlinks=existing.hardlinks))
            return
        if item.is_dir and nested_root and path:
            workspace.create_nested(entry)
            return
        catalog.put(entry)
        if content is not None and content.is_chunked:
            catalog.put_chunks(path, content.chunks)

    def content_of(self, leader: str, path: str) -> FileContent:
        """The content of the regular file ``leader``, written earlier: ``path`` links to it."""
        catalog = self.workspace.catalog_for(leader)
        entry = catalog.lookup(leader)
        if entry is None or not entry.is_regular:
            raise PublishError(f"{path}: hard link to {leader}, which was not added before it")
        chunks = tuple(catalog.chunk_list(leader)) if entry.is_chunked else ()
        return FileContent(entry.size, entry.is_compressed, entry.digest, chunks)

    def _hardlinks(self, mountpoint: str, item: SourceItem) -> int:
        """``(group << 32) | linkcount`` (cvmfs-format.md §4.3); group 0 outside a group."""
        if not item.link_group or item.link_count < 2:
            return 1
        key = (mountpoint, item.link_group)
        if key not in self._groups:
            catalog = self.workspace.catalog_for(item.path)
            used = [g for (m, _), g in self._groups.items() if m == mountpoint]
            self._groups[key] = max([catalog.max_hardlink_group(), *used]) + 1
        return (self._groups[key] << 32) | item.link_count

    def make_catalog_root(self, path: str) -> None:
        """Make the existing directory ``path`` (marked by ``.cvmfscatalog``) a nested catalog.

        A directory created in this transaction already is one (:meth:`put`); an older plain
        directory is split off its catalog, as upstream's publisher does when a marker appears.
        """
        if self.workspace.catalog_for(path).mountpoint == path:
            return
        entry = lookup(self.workspace, path)
        if entry is None or not entry.is_dir:
            raise PublishError(f"{path}/.cvmfscatalog: {path} is not a directory")
        self.workspace.split(path)
