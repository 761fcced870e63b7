"""How catalog rows read back to users, as upstream's client shows them (cvmfs-format.md §4.3-4.4).

* variant symlinks (``$(VAR)``, ``$(VAR:-default)``) are expanded from the client's environment
  and configuration: :func:`present`;
* entries flagged hidden (``0x8000``, e.g. ``/.cvmfs``) are left out of listings but can be
  looked up: :func:`listed`;
* character and block devices keep their ``dev_t`` in ``size``: :func:`device_number`;
* members of a hard-link group share one inode: :func:`hardlink_key`;
* path resolution follows symlinks in every component, the way the kernel does on a mount:
  relative targets from the link's folder, ``..`` from where the walk really is, absolute
  targets only when they point into this repository's ``/cvmfs/<fqrn>`` (anything else is
  outside the repository and refused), and at most :data:`MAX_SYMLINKS` links per path:
  :func:`resolve_path`.
"""

from __future__ import annotations

import dataclasses
import errno
import stat
from collections.abc import Callable, Iterable, Mapping

from cvmfs_ml.cvmfs.catalog import DirectoryEntry, Flag
from cvmfs_ml.cvmfs.symlinks import expand_variant_symlink
from cvmfs_ml.errors import UnsafeInputError

__all__ = [
    "MAX_SYMLINKS",
    "MOUNT_ROOT",
    "device_number",
    "hardlink_key",
    "is_hidden",
    "listed",
    "present",
    "resolve_path",
]

MAX_SYMLINKS = 40
"""Links followed while resolving one path (Linux's ``MAXSYMLINKS``)."""

MOUNT_ROOT = "/cvmfs"
"""Where upstream mounts repositories: an absolute target ``/cvmfs/<fqrn>/x`` is ``x`` here."""


def present(entry: DirectoryEntry, variables: Mapping[str, str]) -> DirectoryEntry:
    """``entry`` as the client shows it: a variant symlink's target expanded (and its size)."""
    if not entry.is_symlink or "$(" not in entry.symlink:
        return entry
    target = expand_variant_symlink(entry.symlink, variables)
    size = len(target.encode("utf-8", "surrogateescape"))
    return dataclasses.replace(entry, symlink=target, size=size)


def is_hidden(entry: DirectoryEntry) -> bool:
    return bool(entry.flags & Flag.HIDDEN)


def listed(entries: Iterable[DirectoryEntry]) -> list[DirectoryEntry]:
    """The entries a directory listing shows (hidden ones left out)."""
    return [e for e in entries if not is_hidden(e)]


def device_number(entry: DirectoryEntry) -> int:
    """``st_rdev`` of a character or block device (its catalog ``size``); 0 for anything else."""
    if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        return max(0, int(entry.size))
    return 0


def hardlink_key(entry: DirectoryEntry) -> tuple[str, int] | None:
    """What the members of ``entry``'s hard-link group share: (folder, group); None when the
    entry is in no group (§4.3: groups are numbered per catalog, members share a folder)."""
    group = entry.hardlink_group
    if group <= 0 or entry.is_dir:
        return None
    return entry.path[: entry.path.rfind("/")], group


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def _inside(target: str, fqrn: str) -> list[str]:
    """The components of an absolute link target inside the repository mounted at
    ``/cvmfs/<fqrn>``; :class:`~cvmfs_ml.errors.UnsafeInputError` for any other place."""
    parts = _components(target)
    prefix = [*_components(MOUNT_ROOT), fqrn]
    if parts[: len(prefix)] != prefix:
        raise UnsafeInputError(
            target, f"the link points outside repository {fqrn} (only {MOUNT_ROOT}/{fqrn}/...)"
        )
    return parts[len(prefix) :]


def resolve_path(
    stat_path: Callable[[str], DirectoryEntry],
    path: str,
    fqrn: str,
    *,
    follow_last: bool = True,
) -> DirectoryEntry:
    """The entry ``path`` leads to, following symlinks in every component.

    ``stat_path`` looks up one repository path (``""`` is the root, others ``/a/b``) without
    following links and raises :class:`FileNotFoundError` for a missing one. A ``..`` that
    would climb above the repository root, or an absolute target outside ``/cvmfs/<fqrn>``,
    raises :class:`~cvmfs_ml.errors.UnsafeInputError`; more than :data:`MAX_SYMLINKS` links
    raise ``OSError(ELOOP)``; a file used as a folder raises :class:`NotADirectoryError`.
    """
    todo = _components(path)
    done: list[str] = []
    links = 0
    entry = stat_path("")
    while todo:
        name = todo.pop(0)
        if name == "..":
            if not done:
                raise UnsafeInputError(path, "the path climbs above the repository root")
            done.pop()
            entry = stat_path("/" + "/".join(done) if done else "")
            continue
        if not entry.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", "/" + "/".join(done))
        current = "/" + "/".join([*done, name])
        entry = stat_path(current)
        if entry.is_symlink and (todo or follow_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = entry.symlink
            if target.startswith("/"):
                todo = _inside(target, fqrn) + todo
                done = []
            else:
                todo = _components(target) + todo
            entry = stat_path("/" + "/".join(done) if done else "")
            continue
        done.append(name)
    return entry
