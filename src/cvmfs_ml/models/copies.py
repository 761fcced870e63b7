"""What a materialised copy was made from, so that a copy of old bytes is never handed out.

A version never changes while it is published, but it can be removed and published again with
other bytes (``model rm``, then ``model publish`` of another folder as the same version). A copy
under ``<cache base>/materialised/<fqrn>/<path>`` is therefore checked against the repository
whenever the repository answers: :func:`content_id` digests the catalog entries below the path
(names, types, sizes, content hashes, link targets: no file content is fetched), and the digest
the copy was made from is kept in ``materialised/.sources/<fqrn>/<path>.from``, outside the copy
(a model's folder holds the model's files only). A copy whose record differs, or that has none,
is made again; :func:`set_aside` moves the old one out of the way first and removes it after.

A link that leads out of the path to a regular file of the repository is copied as that file's
bytes (:func:`followed` decides, for the copy and for its identity alike), so the identity holds
what the link leads to (that file's path and content hashes), not only its text: a shared file
published again with other bytes makes the copy again. Each link is followed once, within the
hops a path may take (:func:`cvmfs_ml.client.entries.resolve_path`), through catalog entries only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvmfs_ml.client.entries import resolve_path as follow_links
from cvmfs_ml.errors import UnsafeInputError
from cvmfs_ml.storage.held import held_folder

__all__ = [
    "STAGING_PREFIX",
    "content_id",
    "followed",
    "record_path",
    "recorded",
    "set_aside",
    "write_record",
]

#: Folders beside a copy while it is made (or set aside): held with a lock for the life of the
#: process filling them (:mod:`cvmfs_ml.storage.held`), removed by the next one if it was killed.
STAGING_PREFIX = ".cvmfs-ml-partial."

_RECORDS = ".sources"  # no repository name starts with a dot: never a repository's folder
_SUFFIX = ".from"
_MAX_RECORD = 256  # a hex digest and its prefix


_NO_REPOSITORY = "/"  # no folder is named "/": every absolute link target leads out of the folder


def _stays_inside(repo: Any, base: str, link: str) -> bool:
    """Whether the link at ``link`` (below ``base``) leads to something inside ``base`` when
    followed the way the copy in the destination will be: every link on the way, relative, and
    no ``..`` above ``base``. Raises ``FileNotFoundError``/``OSError`` for a link that leads to
    nothing (missing, a loop), which does the same in the destination."""
    try:
        follow_links(lambda path: repo.stat(base + path), link[len(base) :], _NO_REPOSITORY)
    except UnsafeInputError:
        return False
    return True


def followed(repo: Any, base: str, entry: Any) -> Any:
    """Where the link ``entry`` leads: ``None`` inside ``base`` (as the copy will follow it),
    else the repository's entry, or why it is neither (a string)."""
    try:
        if _stays_inside(repo, base, entry.path):
            return None
        resolved = repo.resolve(entry.path)  # the repository's own entries only, never this disk
    except UnsafeInputError:
        return "leads outside the folder and the repository"
    except FileNotFoundError:
        return "leads to nothing"
    except OSError as exc:  # a loop, a file used as a folder
        return f"cannot be followed ({exc.strerror or exc})"
    if resolved.is_regular:
        return resolved
    return "leads outside the folder to a " + ("folder" if resolved.is_dir else "special file")


def _content(repo: Any, entry: Any) -> str:
    """The content hashes of the regular file ``entry`` (its pieces' when chunked)."""
    if entry.digest is not None:
        return str(entry.digest)
    return ",".join(str(piece.digest) for piece in repo.layout(entry).pieces)


def content_id(repo: Any, top: Any) -> str:
    """``sha256:<hex>`` of what the repository holds at ``top`` (an entry, links resolved), and
    of what each link below it that leads out of it is copied as (:func:`followed`)."""
    digest = hashlib.sha256()
    entries = [top] if not top.is_dir else [top, *repo.walk(top.path)]
    for entry in entries:
        rel = posixpath.relpath(entry.path, top.path) if entry.path != top.path else "."
        content = _content(repo, entry) if entry.is_regular else ""
        if entry.is_symlink and entry.symlink and "\0" not in entry.symlink:
            found = followed(repo, top.path, entry)
            if isinstance(found, str):
                content = found
            elif found is not None:
                content = f"{found.path}\0{found.size}\0{_content(repo, found)}"
        line = f"{rel}\0{entry.mode >> 12:o}\0{entry.size}\0{content}\0{entry.symlink}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return f"sha256:{digest.hexdigest()}"


def record_path(base: Path, fqrn: str, path: str) -> Path:
    """Where the identity of the copy ``base/<fqrn>/<path>`` is kept."""
    return base / _RECORDS / fqrn / (path.strip("/") + _SUFFIX)


def recorded(record: Path) -> str | None:
    """The identity written for a copy, or ``None`` (none written, unreadable: made again)."""
    try:
        with open(record, "rb") as handle:
            return handle.read(_MAX_RECORD).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def write_record(record: Path, ident: str) -> None:
    """Write ``ident`` for a copy (atomically: a half-written record would be a mismatch)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{record.name}.", dir=record.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(ident + "\n")
        os.replace(temp, record)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def set_aside(dest: Path) -> Iterator[None]:
    """Move the stale copy ``dest`` out of the way for the body to make a new one there, then
    remove it; put it back where the body fails (the record still describes it).

    Processes reading the old copy keep their open files; the old folder goes into a staging
    folder beside it (held as a copy being made is, so a killed process leaves it to the next)."""
    with held_folder(dest.parent, STAGING_PREFIX, f"{dest.name}.") as aside:
        old = aside / "stale"
        with contextlib.suppress(FileNotFoundError):  # another process set it aside first
            os.rename(dest, old)
        try:
            yield
        except BaseException:
            if old.exists() and not dest.exists():
                with contextlib.suppress(OSError):
                    os.rename(old, dest)
            raise
