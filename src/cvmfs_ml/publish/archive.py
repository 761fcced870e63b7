"""Tarballs as untrusted input: read to their end, every member validated before anything is used.

Python's :mod:`tarfile` alone cannot be trusted with hostile archives: it takes a corrupt header
for the end of the archive (so the members after it vanish silently), and it stops reading at the
end-of-archive blocks, so the compressed stream's checksum (gzip CRC32, bzip2 block CRCs, xz
check) is never verified. :func:`read_tar_plan` therefore

1. decompresses the stream itself, lets :mod:`tarfile` list the members, then reads the rest of
   the stream: it must be the end-of-archive marker (two zero blocks, zero padding only) up to
   the very end of the compressed stream, whose checksum the codec verifies on that last read;
2. checks every member against the tree being built: normalised names, no ``..``, no absolute
   names, ``NAME_MAX`` (255 bytes) per component and ``PATH_MAX`` (4096 bytes) per path, no
   member below a file or symlink, no duplicate that changes an entry's type, symlink targets
   resolved *physically* through the other symlinks of the tree (so ``sub/x -> ..`` followed by
   ``y -> sub/x/../..`` is caught although each text looks harmless), and hard links only to
   earlier regular files.

Names are ``str`` decoded with ``surrogateescape``: a name that is not UTF-8 keeps its bytes end
to end (upstream publishes such names unchanged).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.errors import UnsafeInputError

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "STREAM_ERRORS",
    "ArchiveMember",
    "TarPlan",
    "check_name_limits",
    "encoded",
    "open_tar",
    "read_tar_plan",
    "verify_end",
]

NAME_MAX = 255  # bytes per path component (Linux, and the limit upstream's client serves)
PATH_MAX = 4096  # bytes per full path with its terminating NUL: at most 4095 bytes of text
_SYMLOOP_MAX = 40  # Linux's limit on symlinks followed while resolving one path
# A member's numbers as a catalog row holds them: a uid or gid is a uid_t/gid_t (readers refuse a
# row past 32 bits, a stat() of it overflows) and an mtime an SQLite INTEGER (64 bits). A PAX
# header carries any decimal, so a tarball could publish a file no reader takes, or end the
# publish with an OverflowError.
_ID_RANGE = range(2**32)
_TIME_RANGE = range(-(2**63), 2**63)
_BLOCK = tarfile.BLOCKSIZE
_READ = 1 << 20
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
# What a broken compressed stream raises while being read.
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError)


def encoded(name: str) -> bytes:
    """The bytes of a name as it is stored (UTF-8, with undecodable bytes kept as they were)."""
    return name.encode(_ENCODING, _ERRORS)


def check_name_limits(path: str, what: str) -> None:
    """Refuse a repository path with a component over ``NAME_MAX`` or a length over ``PATH_MAX``."""
    raw = encoded(path)
    if len(raw) >= PATH_MAX:
        raise UnsafeInputError(what, f"path of {len(raw)} bytes exceeds PATH_MAX ({PATH_MAX})")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise UnsafeInputError(
                what, f"name component of {len(part)} bytes exceeds NAME_MAX ({NAME_MAX})"
            )


@contextmanager
def _decompressed(path: Path) -> Iterator[BinaryIO]:
    """``path``'s bytes, decompressed if the first bytes name gzip, bzip2 or xz."""
    with open(path, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        stream: BinaryIO
        if magic.startswith(b"\x1f\x8b"):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif magic.startswith(b"BZh"):
            stream = bz2.BZ2File(raw, "rb")  # type: ignore[assignment]
        elif magic.startswith(b"\xfd7zXZ\x00"):
            stream = lzma.LZMAFile(raw, "rb")  # type: ignore[assignment]  # noqa: SIM115
        else:
            stream = raw
        try:
            yield stream
        finally:
            if stream is not raw:
                stream.close()


class _Tracked:
    """The decompressed stream as :mod:`tarfile` sees it, remembering the last header read.

    tarfile reads the block where it stops (zeros, or a broken header) and leaves the stream
    past it; going back to look at that block again would make a gzip stream start over from
    its first byte, so the block is kept here instead.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.last_offset = -1
        self.last_block = b""

    def read(self, size: int = -1) -> bytes:
        offset = self._stream.tell()
        data = self._stream.read(size)
        if size == _BLOCK:
            self.last_offset, self.last_block = offset, data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


@contextmanager
def open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A :class:`tarfile.TarFile` over the decompressed stream; broken input -> one clear error."""
    with _decompressed(Path(path)) as stream:
        try:
            archive = tarfile.open(  # noqa: SIM115 - closed below
                fileobj=_Tracked(stream),  # type: ignore[arg-type]
                mode="r:",
                encoding=_ENCODING,
                errors=_ERRORS,
            )
        except STREAM_ERRORS as exc:
            raise UnsafeInputError(
                str(path), f"not a readable tar archive ({_reason(exc)})"
            ) from exc
        try:
            yield archive
        finally:
            archive.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def verify_end(archive: tarfile.TarFile, path: Path) -> None:
    """After the last member: end-of-archive blocks, zero padding, a good stream checksum."""
    stream = archive.fileobj
    assert isinstance(stream, _Tracked)
    try:
        if stream.last_offset == archive.offset:  # the block tarfile stopped at, read already
            first = stream.last_block
            stream.seek(archive.offset + len(first))
        else:
            stream.seek(archive.offset)
            first = b""
        zeros = 0
        block = first
        while block or (block := stream.read(_READ)):
            if block.count(0) != len(block):
                at = archive.offset + zeros + next(i for i, b in enumerate(block) if b)
                raise UnsafeInputError(
                    str(path),
                    f"corrupt or truncated tar header at byte {archive.offset} "
                    f"(non-zero data at {at} where the archive should end)",
                )
            zeros += len(block)
            block = b""
    except STREAM_ERRORS as exc:
        raise UnsafeInputError(
            str(path), f"corrupt or truncated compressed stream ({_reason(exc)})"
        ) from exc
    if zeros < 2 * _BLOCK:
        raise UnsafeInputError(str(path), "truncated: the archive has no end-of-archive marker")


@dataclass
class ArchiveMember:
    """One validated member: its normalised relative name and what it becomes."""

    info: tarfile.TarInfo
    name: str  # normalised, relative to the archive root ("" is the root itself)
    same_as: str = ""  # hard links: the name of the regular file whose content this is
    link_group: str = ""  # regular files and hard links: one key per hard-link group
    link_count: int = 1  # members of that group (1: an ordinary file)


@dataclass
class TarPlan:
    """Every member of a validated archive, in archive order, duplicates folded."""

    members: list[ArchiveMember] = field(default_factory=list)


def _relative(info: tarfile.TarInfo) -> str:
    name = info.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeInputError(name, "absolute path in tarball")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeInputError(name, "'..' in tarball path")
    if "\x00" in name:
        raise UnsafeInputError(name, "NUL in tarball path")
    return "/".join(parts)


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "directory"
    if info.issym():
        return "symlink"
    if info.isfifo():
        return "fifo"
    return "file"  # regular files and hard links


class _Tree:
    """The tree an archive builds, for checks that need the other members."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {"": "directory"}
        self.links: dict[str, str] = {}  # symlink name -> target text

    def add(self, name: str, kind: str, member: str) -> None:
        parent = name.rpartition("/")[0] if "/" in name else ""
        # Walk the parents: each one a directory, or not there yet (then created as one).
        current = ""
        for part in parent.split("/") if parent else []:
            current = f"{current}/{part}" if current else part
            existing = self.kinds.get(current)
            if existing is None:
                self.kinds[current] = "directory"
            elif existing != "directory":
                raise UnsafeInputError(member, f"{current!r} is a {existing}, not a directory")
        previous = self.kinds.get(name)
        if previous is not None and (previous != "directory" or kind != "directory"):
            raise UnsafeInputError(
                member, f"appears twice in the archive (an earlier member made it a {previous})"
            )
        self.kinds[name] = kind

    def resolve(self, link: str, member: str) -> None:
        """Follow ``link`` through the tree's symlinks like the kernel would; refuse escapes."""
        stack: list[str] = [p for p in link.split("/")[:-1] if p]
        pending: list[str] = self.links[link].split("/")
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    raise UnsafeInputError(
                        member, f"symlink {self.links[link]!r} escapes the tree (through links)"
                    )
                stack.pop()
                continue
            stack.append(part)
            here = "/".join(stack)
            if here in self.links:
                hops += 1
                if hops > _SYMLOOP_MAX:
                    raise UnsafeInputError(member, "too many levels of symbolic links")
                target = self.links[here]
                if target.startswith("/"):
                    raise UnsafeInputError(member, f"symlink chain reaches absolute {target!r}")
                stack.pop()
                pending = target.split("/") + pending


def read_tar_plan(path: Path, at: str = "") -> TarPlan:
    """Validate the archive at ``path`` completely (see the module docstring) and list it."""
    path = Path(path)
    plan = TarPlan()
    tree = _Tree()
    first_file: dict[str, ArchiveMember] = {}
    groups: dict[str, list[ArchiveMember]] = {}
    with open_tar(path) as archive:
        try:
            for info in archive:
                plan.members.append(_check(info, at, tree, first_file, groups))
        except STREAM_ERRORS as exc:
            if isinstance(exc, UnsafeInputError):
                raise
            raise UnsafeInputError(
                str(path), f"corrupt or truncated archive ({_reason(exc)})"
            ) from exc
        verify_end(archive, path)
    for name in tree.links:
        tree.resolve(name, name)
    for members in groups.values():
        for member in members:
            member.link_count = len(members)
    return plan


def _check(
    info: tarfile.TarInfo,
    at: str,
    tree: _Tree,
    first_file: dict[str, ArchiveMember],
    groups: dict[str, list[ArchiveMember]],
) -> ArchiveMember:
    name = _relative(info)
    check_name_limits(f"{at.rstrip('/')}/{name}", info.name)
    if info.ischr() or info.isblk():
        raise UnsafeInputError(info.name, "device file in tarball")
    if not (info.isreg() or info.isdir() or info.issym() or info.islnk() or info.isfifo()):
        raise UnsafeInputError(info.name, f"unsupported member type {info.type!r}")
    if not name and not info.isdir():
        raise UnsafeInputError(info.name, "a non-directory cannot replace the tree's root")
    _check_numbers(info)
    member = ArchiveMember(info, name)
    tree.add(name, _kind(info), info.name)
    if info.issym():
        target = info.linkname
        if target.startswith("/"):
            raise UnsafeInputError(info.name, f"symlink to absolute path {target!r}")
        if len(encoded(target)) >= PATH_MAX:
            raise UnsafeInputError(info.name, "symlink target exceeds PATH_MAX")
        tree.links[name] = target  # resolved once the whole tree is known (a later member
        # can be a link the target goes through)
    elif info.islnk():
        target = info.linkname
        if target.startswith("/"):
            raise UnsafeInputError(info.name, f"hard link to {target!r} escapes the tree")
        parts = [p for p in target.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnsafeInputError(info.name, f"hard link to {target!r} escapes the tree")
        leader = first_file.get("/".join(parts))
        if leader is None:
            raise UnsafeInputError(
                info.name, f"hard link to {target!r}, which is not an earlier regular file"
            )
        member.same_as = leader.name
        _join_group(member, leader.name, groups)
    elif info.isreg():
        first_file[name] = member
        _join_group(member, name, groups)
    return member


def _check_numbers(info: tarfile.TarInfo) -> None:
    """Refuse a uid, gid or mtime no catalog row holds (:data:`_ID_RANGE`, :data:`_TIME_RANGE`)."""
    mtime = info.mtime
    if isinstance(mtime, float) and not math.isfinite(mtime):
        raise UnsafeInputError(info.name, f"mtime {mtime} is not a time")
    for key, value, allowed in (("uid", info.uid, _ID_RANGE), ("gid", info.gid, _ID_RANGE),
                                ("mtime", int(mtime), _TIME_RANGE)):  # fmt: skip
        if value not in allowed:
            raise UnsafeInputError(
                info.name, f"{key} {str(value)[:40]} is out of range"  # a PAX number: any length
                f" ({allowed.start}..{allowed.stop - 1})",
            )


def _join_group(member: ArchiveMember, leader: str, groups: dict[str, list[ArchiveMember]]) -> None:
    """Hard-link groups live in one directory (catalog_mgr_rw.cc AddHardlinkGroup): links to the
    same file from another directory form their own group there, with the same content."""
    directory = member.name.rpartition("/")[0]
    key = f"{directory}\0{leader}"
    member.link_group = key
    groups.setdefault(key, []).append(member)
