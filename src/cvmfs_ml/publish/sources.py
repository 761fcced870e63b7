"""What a transaction adds: entries scanned from a folder or read from a tarball.

Both sources yield :class:`SourceItem` values in an order where every directory comes before its
contents. Tarballs are untrusted input, validated whole by :mod:`cvmfs_ml.publish.archive`
*before* anything is written (stream read to its end, names, limits, links); a refusal is an
:class:`UnsafeInputError`. Names are ``str`` holding their original bytes (``surrogateescape``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.errors import UnsafeInputError
from cvmfs_ml.publish.archive import (
    STREAM_ERRORS,
    ArchiveMember,
    TarPlan,
    check_name_limits,
    encoded,
    open_tar,
    read_tar_plan,
    verify_end,
)
from cvmfs_ml.publish.filecache import FileKey

__all__ = ["SourceItem", "join_repo_path", "scan_folder", "scan_tarball"]


@dataclass(slots=True)
class SourceItem:
    """One entry to publish at ``path`` (a full repository path, ``/a/b``).

    Slotted: a publish holds one per entry until its catalog rows are written.
    """

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
    same_as: str = ""  # a hard link: the path of the file (added earlier) whose content it has
    link_group: str = ""  # files of one hard-link group share this key (one directory only)
    link_count: int = 1  # members in that group

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
    path = "/" + "/".join(parts) if parts else ""
    check_name_limits(path, path)
    return path


_XATTR_MAX = 255  # bytes per name and per value: the catalog's 1-byte length fields (§4.6)


def _user_xattrs(path: str) -> dict[bytes, bytes]:
    """``user.*`` attributes only: security/system ones describe the publisher's machine.

    Checked here, before anything is written, against what a catalog can hold.
    """
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if not name.startswith("user."):
            continue
        with contextlib.suppress(OSError):
            key, value = os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)
            if len(key) > _XATTR_MAX or len(value) > _XATTR_MAX:
                raise UnsafeInputError(
                    path,
                    f"extended attribute {name} ({len(value)} bytes) exceeds the {_XATTR_MAX} "
                    "bytes a catalog can hold; remove it or publish without extended attributes",
                )
            out[key] = value
    if len(out) > _XATTR_MAX:
        raise UnsafeInputError(path, f"{len(out)} extended attributes, at most {_XATTR_MAX} fit")
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
        check_name_limits(repo_path, path)
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
            result.file_key = FileKey.of(st)
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
        # Names only: a DirEntry keeps its stat result, and a folder's entries live until the
        # last is published (a folder of 300,000 files held 240 MB of them).
        with os.scandir(folder) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            repo_path = f"{repo_folder}/{name}"
            yield item(path, st, repo_path)
            if stat.S_ISDIR(st.st_mode):
                stack.append((path, repo_path))


def scan_tarball(path: Path, at: str = "", plan: TarPlan | None = None) -> Iterator[SourceItem]:
    """Yield the entries of a (possibly compressed) tarball, validated by :func:`read_tar_plan`.

    Validation reads the whole archive first (``plan``, made here when not given), so a bad
    member or a broken stream anywhere refuses the tarball before any content is processed; this
    second pass checks that it reads the same members, and the stream's end and checksum again,
    so an archive changed in between fails instead of publishing other bytes. Parent
    directories missing from the archive are created with mode 0755, as ``cvmfs_server ingest``
    does. Hard links keep their group (:attr:`SourceItem.link_group`); their content is read once.
    """
    path = Path(path)
    plan = plan if plan is not None else read_tar_plan(path, at)
    now = int(time.time())
    base = join_repo_path(at, "")
    with open_tar(path) as archive:
        seen_dirs = {base}
        yield SourceItem(path=base, mode=stat.S_IFDIR | 0o755, mtime=now, size=4096)
        expected = iter(plan.members)
        leaders: dict[str, tarfile.TarInfo] = {}
        try:
            for info in archive:
                member = next(expected, None)
                if member is None or (member.info.name, member.info.type, member.info.size) != (
                    info.name,
                    info.type,
                    info.size,
                ):
                    raise UnsafeInputError(str(path), "the archive changed while it was published")
                if info.isreg():
                    leaders[member.name] = info
                if not member.name:
                    continue
                repo_path = join_repo_path(base, member.name)
                missing = []
                parent = repo_path[: repo_path.rfind("/")]
                while parent and parent not in seen_dirs:
                    missing.append(parent)
                    parent = parent[: parent.rfind("/")]
                for directory in reversed(missing):
                    seen_dirs.add(directory)
                    yield SourceItem(
                        path=directory, mode=stat.S_IFDIR | 0o755, mtime=now, size=4096
                    )
                yield _tar_item(archive, member, repo_path, base, leaders)
                if info.isdir():
                    seen_dirs.add(repo_path)
        except STREAM_ERRORS as exc:
            if isinstance(exc, UnsafeInputError):
                raise
            raise UnsafeInputError(str(path), f"corrupt or truncated archive ({exc})") from exc
        if next(expected, None) is not None:
            raise UnsafeInputError(str(path), "the archive changed while it was published")
        verify_end(archive, path)


def _tar_item(
    archive: tarfile.TarFile,
    member: ArchiveMember,
    repo_path: str,
    base: str,
    leaders: dict[str, tarfile.TarInfo],
) -> SourceItem:
    info = leaders[member.same_as] if member.same_as else member.info
    item = SourceItem(
        path=repo_path,
        mode=(info.mode & 0o7777) | _tar_type(info),
        mtime=int(info.mtime),
        uid=info.uid,
        gid=info.gid,
    )
    if info.isreg():
        item.size = info.size
        item.link_count = member.link_count
        item.link_group = member.link_group if member.link_count > 1 else ""
        if member.same_as:
            item.same_as = join_repo_path(base, member.same_as)
        else:
            item.open = _tar_opener(archive, info)
    elif info.issym():
        item.symlink = info.linkname
        item.size = len(encoded(info.linkname))
    elif info.isdir():
        item.size = 4096
    return item


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
