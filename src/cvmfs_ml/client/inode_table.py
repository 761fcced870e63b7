"""The inodes a mount has handed to the kernel, and when it may let them go.

The kernel counts how often it received each inode (every ``lookup`` answer and every entry a
``readdir`` hands over, except ``.`` and ``..``) and sends ``forget`` with those counts when it
drops the inode from its caches. An inode that reached zero is unknown to the kernel and is
removed here with its path and entry, as upstream's client does (its inode tracker): without
this a long-lived mount kept an entry for every path ever listed (``ls`` of a folder of 10^6
entries grew the daemon by over 1 GB, for good).

Members of a hard-link group share one inode, as with upstream's client; a group lives in one
directory and its id is unique in that directory's catalog (cvmfs-format.md §4.3).
"""

from __future__ import annotations

from collections.abc import Hashable

from cvmfs_ml.cvmfs.catalog import DirectoryEntry

__all__ = ["InodeTable"]


class InodeTable:
    """Inode numbers by path and back, the entry served for each, and the kernel's counts.

    Numbers are never reused: a path forgotten and looked up again gets a new inode, so an
    inode always stands for the one entry (of one revision) it was given for.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._paths: dict[int, str] = {root: ""}
        self._inodes: dict[str, int] = {"": root}
        self._entries: dict[int, DirectoryEntry] = {}
        self._lookups: dict[int, int] = {}
        self._groups: dict[Hashable, int] = {}
        self._group_of: dict[int, tuple[Hashable, list[str]]] = {}  # group inode: key, paths
        self._next = root + 1

    def __len__(self) -> int:
        return len(self._paths)

    def inode_for(self, path: str, group: Hashable | None = None) -> int:
        """The inode of ``path``, made if it has none (``group``: its hard-link group key)."""
        inode = self._inodes.get(path)
        if inode is not None:
            return inode
        inode = self._groups.get(group) if group is not None else None
        if inode is None:
            inode = self._next
            self._next += 1
            self._paths[inode] = path
            if group is not None:
                self._groups[group] = inode
                self._group_of[inode] = (group, [])
        if inode in self._group_of:
            self._group_of[inode][1].append(path)
        self._inodes[path] = inode
        return inode

    def current(self, path: str) -> int | None:
        """The inode ``path`` has now, if any."""
        return self._inodes.get(path)

    def path(self, inode: int) -> str | None:
        return self._paths.get(inode)

    def entry(self, inode: int) -> DirectoryEntry | None:
        return self._entries.get(inode)

    def set_entry(self, inode: int, entry: DirectoryEntry) -> None:
        """Record the entry served for ``inode`` (ignored for an inode already forgotten)."""
        if inode in self._paths:
            self._entries[inode] = entry

    # -- the kernel's counts ------------------------------------------------------------------
    def handed_out(self, inode: int) -> None:
        """The kernel received ``inode`` once more (a lookup answer, a readdir entry)."""
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` of its references; at zero the inode goes."""
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
        else:
            self._lookups.pop(inode, None)
            self._drop(inode)

    def drop_if_unknown(self, inode: int) -> None:
        """Remove ``inode`` if the kernel never received it (a readdir entry it refused)."""
        if inode not in self._lookups:
            self._drop(inode)

    def _drop(self, inode: int) -> None:
        if inode == self.root:
            return
        path = self._paths.pop(inode, None)
        self._entries.pop(inode, None)
        group = self._group_of.pop(inode, None)
        paths = group[1] if group is not None else [path]
        if group is not None and self._groups.get(group[0]) == inode:
            del self._groups[group[0]]
        for member in paths:
            if member is not None and self._inodes.get(member) == inode:
                del self._inodes[member]

    # -- live updates (cvmfs_ml.client.fuse_live) -----------------------------------------------
    def known(self) -> list[tuple[str, int, DirectoryEntry | None]]:
        """``(path, inode, entry served)`` for every path with an inode."""
        return [(path, inode, self._entries.get(inode)) for path, inode in self._inodes.items()]

    def detach(self, path: str, inode: int) -> None:
        """``path`` no longer names ``inode`` (a new revision changed it); the inode keeps its
        entry for files still open, until the kernel forgets it. A hard-link group's key then
        names no inode: the new revision's members get a new one (group numbers are per
        revision)."""
        if self._inodes.get(path) == inode:
            del self._inodes[path]
        group = self._group_of.get(inode)
        if group is not None and self._groups.get(group[0]) == inode:
            del self._groups[group[0]]
