"""What a transaction adds: entries scanned from a folder or read from a tarball.

Both sources yield :class:`SourceItem` values in an order where every directory comes before its
contents. Tarballs are untrusted input: absolute names, ``..`` components, symlinks or hard links
that escape the tree, and device files are refused with :class:`UnsafeInputError` *before*
anything is written.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.errors import UnsafeInputError
from cvmfs_ml.publish.filecache import FileKey

__all__ = ["SourceItem", "join_repo_path", "scan_folder", "scan_tarball"]


@dataclass
class SourceItem:
    """One entry to publish at ``path`` (a full repository path, ``/a/b``)."""

    path: str
    mode: int
    mtime: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    symlink: str = ""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    open: Callable[[], BinaryIO] | None = None  # regular files only
    file_key: FileKey | None = None  # local files: lets an unchanged file skip re-reading

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


def join_repo_path(base: str, relative: str) -> str:
    """``base`` + ``relative`` as a normalised repository path (``""`` is the root)."""
    parts = [p for p in f"{base}/{relative}".split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeInputError(f"{base}/{relative}", "'..' in a repository path")
    return "/" + "/".join(parts) if parts else ""


def _user_xattrs(path: str) -> dict[bytes, bytes]:
    """``user.*`` attributes only: security/system ones describe the publisher's machine."""
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if not name.startswith("user."):
            continue
        with contextlib.suppress(OSError):
            out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _opener(path: str) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def scan_folder(src: Path, at: str = "", *, include_xattrs: bool = True) -> Iterator[SourceItem]:
    """Walk ``src`` (not following symlinks) and yield its entries under ``at``.

    The folder itself becomes the directory ``at``. Hard links are published as independent
    files (upstream 2.12 does the same on overlayfs); special files are kept as special entries.
    """
    src = Path(src)
    root_stat = os.lstat(src)
    if not stat.S_ISDIR(root_stat.st_mode):
        raise UnsafeInputError(str(src), "not a folder")

    def item(path: str, st: os.stat_result, repo_path: str) -> SourceItem:
        mode = st.st_mode
        result = SourceItem(
            path=repo_path,
            mode=mode,
            mtime=int(st.st_mtime),
            uid=st.st_uid,
            gid=st.st_gid,
            xattrs=_user_xattrs(path) if include_xattrs else {},
        )
        if stat.S_ISREG(mode):
            result.size = st.st_size
            result.open = _opener(path)
            result.file_key = FileKey(
                st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
            )
        elif stat.S_ISLNK(mode):
            result.symlink = os.readlink(path)
            result.size = len(os.fsencode(result.symlink))
        elif stat.S_ISDIR(mode):
            result.size = 4096
        else:
            result.rdev = st.st_rdev
        return result

    yield item(str(src), root_stat, join_repo_path(at, ""))
    stack = [(str(src), join_repo_path(at, ""))]
    while stack:
        folder, repo_folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            repo_path = f"{repo_folder}/{entry.name}"
            yield item(entry.path, st, repo_path)
            if stat.S_ISDIR(st.st_mode):
                stack.append((entry.path, repo_path))


def _check_member(member: tarfile.TarInfo) -> str:
    """The member's normalised relative name, or :class:`UnsafeInputError`."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeInputError(name, "absolute path in tarball")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeInputError(name, "'..' in tarball path")
    relative = "/".join(parts)
    if member.ischr() or member.isblk():
        raise UnsafeInputError(name, "device file in tarball")
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            raise UnsafeInputError(name, f"symlink to absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeInputError(name, f"symlink {target!r} escapes the tree")
    if member.islnk():
        target = posixpath.normpath(member.linkname)
        if target.startswith(("/", "../")) or target == "..":
            raise UnsafeInputError(name, f"hard link to {member.linkname!r} escapes the tree")
    return relative


def scan_tarball(path: Path, at: str = "") -> Iterator[SourceItem]:
    """Validate every member of a (possibly compressed) tarball, then yield its entries.

    Validation runs over the whole archive first, so a bad member late in the archive refuses the
    tarball before any content is processed. Parent directories missing from the archive are
    created with mode 0755, as ``cvmfs_server ingest`` does.
    """
    with tarfile.open(path, "r:*") as archive:
        members = archive.getmembers()
        names = {}
        for member in members:
            names[member.name] = _check_member(member)
    now = int(time.time())
    # Reopen for sequential extraction: extractfile on a compressed stream reads forward.
    archive = tarfile.open(path, "r:*")  # noqa: SIM115 - closed when the generator ends
    try:
        seen_dirs = {join_repo_path(at, "")}
        by_name = {m.name: m for m in members}
        yield SourceItem(
            path=join_repo_path(at, ""), mode=stat.S_IFDIR | 0o755, mtime=now, size=4096
        )
        for member in members:
            relative = names[member.name]
            if not relative:
                continue
            repo_path = join_repo_path(at, relative)
            parents = []
            parent = repo_path[: repo_path.rfind("/")]
            while parent and parent not in seen_dirs:
                parents.append(parent)
                parent = parent[: parent.rfind("/")]
            for missing in reversed(parents):
                seen_dirs.add(missing)
                yield SourceItem(path=missing, mode=stat.S_IFDIR | 0o755, mtime=now, size=4096)
            target = member
            if member.islnk():  # a hard link is published as a copy of its target
                linked = by_name.get(member.linkname) or by_name.get("./" + member.linkname)
                if linked is None or not linked.isreg():
                    raise UnsafeInputError(member.name, "hard link to a missing member")
                target = linked
            item = SourceItem(
                path=repo_path,
                mode=(target.mode & 0o7777) | _tar_type(target),
                mtime=int(member.mtime),
                uid=member.uid,
                gid=member.gid,
            )
            if target.isreg():
                item.size = target.size
                item.open = _tar_opener(archive, target)
            elif member.issym():
                item.symlink = member.linkname
                item.size = len(member.linkname.encode())
            elif member.isdir():
                item.size = 4096
                seen_dirs.add(repo_path)
            yield item
    finally:
        archive.close()


def _tar_type(member: tarfile.TarInfo) -> int:
    if member.isdir():
        return stat.S_IFDIR
    if member.issym():
        return stat.S_IFLNK
    if member.isfifo():
        return stat.S_IFIFO
    return stat.S_IFREG


def _tar_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], BinaryIO]:
    def open_member() -> BinaryIO:
        handle = archive.extractfile(member)
        if handle is None:
            raise UnsafeInputError(member.name, "cannot read member")
        return handle  # type: ignore[return-value]

    return open_member
