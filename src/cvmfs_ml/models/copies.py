"""What a materialised copy was made from, so that a copy of old bytes is never handed out.

A version never changes while it is published, but it can be removed and published again with
other bytes (``model rm``, then ``model publish`` of another folder as the same version). A copy
under ``<cache base>/materialised/<fqrn>/<path>`` is therefore checked against the repository
whenever the repository answers: :func:`content_id` digests the catalog entries below the path
(names, types, sizes, content hashes, link targets: no file content is fetched), and the digest
the copy was made from is kept in ``materialised/.sources/<fqrn>/<path>.from``, outside the copy
(a model's folder holds the model's files only). A copy whose record differs, or that has none,
is made again; :func:`set_aside` moves the old one out of the way first and removes it after.
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

from cvmfs_ml.storage.held import held_folder

__all__ = ["STAGING_PREFIX", "content_id", "record_path", "recorded", "set_aside", "write_record"]

#: Folders beside a copy while it is made (or set aside): held with a lock for the life of the
#: process filling them (:mod:`cvmfs_ml.storage.held`), removed by the next one if it was killed.
STAGING_PREFIX = ".cvmfs-ml-partial."

_RECORDS = ".sources"  # no repository name starts with a dot: never a repository's folder
_SUFFIX = ".from"
_MAX_RECORD = 256  # a hex digest and its prefix


def content_id(repo: Any, top: Any) -> str:
    """``sha256:<hex>`` of what the repository holds at ``top`` (an entry, links resolved)."""
    digest = hashlib.sha256()
    entries = [top] if not top.is_dir else [top, *repo.walk(top.path)]
    for entry in entries:
        rel = posixpath.relpath(entry.path, top.path) if entry.path != top.path else "."
        content = ""
        if entry.is_regular:
            content = str(entry.digest) if entry.digest is not None else ",".join(
                str(piece.digest) for piece in repo.layout(entry).pieces
            )  # fmt: skip
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
