"""Uploaded tarballs: checked when they arrive, unpacked under a CID's folder when published.

``striplevels`` is user-pub's (``tar --strip-components``, 0 to 2). The checks run before a job
is queued, so a hostile or broken upload is answered with a 4xx and never reaches the worker:
the publisher's own member validation (absolute names, ``..``, escaping links, devices), plus
bounds on member count and unpacked size (a small compressed body can expand enormously).
"""

from __future__ import annotations

import importlib
import posixpath
from collections.abc import Iterator
from pathlib import Path

from cvmfs_ml.cvmfs.catalog import MARKER
from cvmfs_ml.errors import CvmfsMlError, UnsafeInputError
from cvmfs_ml.models.sources.limits import MAX_CATALOGS
from cvmfs_ml.publish.archive import STREAM_ERRORS
from cvmfs_ml.publish.sources import SourceItem, join_repo_path, scan_tarball

__all__ = ["MAX_STRIP", "RejectedError", "check_strip", "check_tarball", "tarball_items"]

MAX_STRIP = 2


class RejectedError(CvmfsMlError):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, kind: str = "rejected",
                 retry_after: int = 60) -> None:  # fmt: skip
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind  # the ``errors`` metric's label
        self.retry_after = retry_after  # seconds, the Retry-After of a 429


def tarball_items(tarball: Path, at: str, strip: int = 0) -> Iterator[SourceItem]:
    """The tarball's entries under ``at``, ``strip`` leading components removed.

    ``at`` itself comes first (it becomes the CID's nested catalog root); members with no
    more than ``strip`` components are dropped, as ``tar --strip-components`` drops them.
    """
    base = join_repo_path(at, "")
    for item in scan_tarball(Path(tarball), ""):
        parts = [p for p in item.path.split("/") if p]
        if not parts:
            item.path = base
            yield item
            continue
        if len(parts) <= strip:
            continue
        relative = "/".join(parts[strip:])
        if item.symlink:
            # The publisher checked links against the whole tarball; after stripping, a link
            # must still stay inside this CID's folder (not reach a neighbour's).
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relative), item.symlink))
            if item.symlink.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise UnsafeInputError(relative, f"symlink {item.symlink!r} leaves the CID")
        if item.same_as:
            # A hard link names its leader by the leader's path in the tarball: it moves with
            # the stripping too (a leader stripped away was dropped above, so is refused).
            leader = [p for p in item.same_as.split("/") if p]
            if len(leader) <= strip:
                raise UnsafeInputError(relative, f"hard link to {item.same_as!r}, stripped away")
            item.same_as = join_repo_path(base, "/".join(leader[strip:]))
        item.path = join_repo_path(base, relative)
        yield item


def _read_through(item: SourceItem) -> None:
    """Read a member to its end: a truncated or corrupt stream fails here, not in the worker
    (the headers of a cut-off archive can all parse)."""
    assert item.open is not None
    got = 0
    with item.open() as handle:
        while chunk := handle.read(1 << 20):
            got += len(chunk)
    if got != item.size:
        raise RejectedError(400, f"bad tarball: {item.path} has {got} of {item.size} bytes")


_DECOMPRESSORS = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "lzma"}


def _check_compressed_stream(tarball: Path) -> None:
    """Decompress to the end, so a cut-off or corrupt stream (CRC, trailer) is refused even
    when every member before the cut reads whole."""
    with open(tarball, "rb") as raw:
        magic = raw.read(6)
    for prefix, module_name in _DECOMPRESSORS.items():
        if magic.startswith(prefix):
            module = importlib.import_module(module_name)
            with module.open(tarball, "rb") as stream:
                while stream.read(1 << 20):
                    pass
            return


def check_strip(strip: int | str) -> int:
    """``striplevels`` as a number, or 400: checked before the body is taken (or a resumable
    session given up), since a typo there is no reason to send gigabytes again."""
    if isinstance(strip, str):
        strip = int(strip) if strip.isdigit() and len(strip) < 4 else -1
    if not 0 <= strip <= MAX_STRIP:
        raise RejectedError(400, f"striplevels must be 0 to {MAX_STRIP}")
    return strip


def check_tarball(
    tarball: Path,
    strip: int,
    *,
    max_members: int,
    max_unpacked_bytes: int,
    max_catalogs: int = MAX_CATALOGS,
) -> tuple[int, int]:
    """Validate the whole tarball, reading every member.

    Returns ``(members, unpacked bytes)`` or raises :class:`RejectedError` (400 for a broken or
    unsafe archive, 413 past a bound: members, bytes, or ``.cvmfscatalog`` files, each of which
    makes a nested catalog)."""
    check_strip(strip)
    members = unpacked = catalogs = 0
    try:
        _check_compressed_stream(tarball)
        for item in tarball_items(tarball, "/check", strip):
            members += 1
            if item.is_regular and posixpath.basename(item.path) == MARKER:
                catalogs += 1
                if catalogs > max_catalogs:
                    raise RejectedError(
                        413,
                        f"tarball has more than {max_catalogs} .cvmfscatalog files (each one a"
                        " nested catalog)",
                        "oversized",
                    )
            if item.is_regular and not item.same_as:  # a hard link's bytes are its leader's
                unpacked += item.size
                if unpacked <= max_unpacked_bytes:
                    _read_through(item)
            if members > max_members:
                raise RejectedError(
                    413, f"tarball has more than {max_members} members", "oversized"
                )
            if unpacked > max_unpacked_bytes:
                raise RejectedError(
                    413, f"tarball unpacks to more than {max_unpacked_bytes} bytes", "oversized"
                )
    except UnsafeInputError as exc:
        raise RejectedError(400, f"unsafe tarball: {exc}", "unsafe") from exc
    except (*STREAM_ERRORS, ValueError) as exc:
        if isinstance(exc, CvmfsMlError):
            raise RejectedError(400, f"bad tarball: {exc}", "bad_tarball") from exc
        raise RejectedError(400, f"not a readable tarball: {exc}", "bad_tarball") from exc
    if members <= 1:
        raise RejectedError(400, "empty tarball", "bad_tarball")
    return members, unpacked
