"""A repository laid out as a Stratum 0 web root in a local folder (cvmfs-format.md §1).

``<root>/.cvmfspublished``, ``<root>/.cvmfswhitelist``, ``<root>/data/00..ff/<hash><suffix>``
and ``<root>/data/txn/`` for staging. Any static web server (nginx, ``cvmfs-ml serve``) serves the
folder as it is. Every write is atomic: a temporary file in ``data/txn`` renamed into place, so a
publisher killed at any point leaves only stray files in ``txn``.

:class:`LocalStore` also offers the read interface of the HTTP fetcher (``fetch``,
``fetch_into``), so the client reads a local repository through the same code path.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.cvmfs.hashing import Algorithm, Digest, hash_bytes
from cvmfs_ml.cvmfs.objects import ObjectKind, object_path, stored_bound
from cvmfs_ml.errors import FormatError, NotFoundError, PublishError
from cvmfs_ml.storage.base import copy_verified, decode_verified
from cvmfs_ml.storage.pagecache import WRITEBACK_FROM, start_writeback, syncfs, write_parts_direct

__all__ = ["LocalStore", "ObjectWriter"]

_SPILL_BYTES = 64 * 2**20  # objects larger than this are staged in a file, not in memory
_READ_BLOCK = 4 * 2**20
_counter = itertools.count()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectWriter:
    """Collects one object's stored bytes, then commits it under its name (or drops it).

    Small objects stay in memory so that an object the store already has costs no disk write;
    larger ones spill to a temporary file in ``data/txn``.
    """

    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self._parts: list[bytes] = []
        self._buffered = 0
        self._file: BinaryIO | None = None
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is None:
            self._parts.append(bytes(data))
            self._buffered += len(data)
            if self._buffered > _SPILL_BYTES:
                self._file = self._store._temp_file()
                for part in self._parts:
                    self._file.write(part)
                self._parts = []
        else:
            self._file.write(data)

    def commit(self, rel_path: str) -> bool:
        """Store under ``rel_path``; returns False if the store already had it."""
        if self._store.exists(rel_path):
            self.discard()
            return False
        if self._file is None:
            self._store.put_bytes(rel_path, b"".join(self._parts))
            self._parts = []
        else:
            self._file.close()
            target = self._store.path(rel_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._file.name, target)
            self._file = None
        return True

    def discard(self) -> None:
        self._parts = []
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file.name)
            self._file = None


class LocalStore:
    """Objects and root files of one repository in a local folder.

    ``direct_writes``: objects of 1 MiB and more are written around the page cache
    (``O_DIRECT``) where the file system allows it, and through it where not.
    """

    def __init__(self, root: Path | str, *, direct_writes: bool = True) -> None:
        self.root = Path(root)
        self.direct_writes = direct_writes

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def location(self) -> str:
        return str(self.root)

    def staging_dir(self) -> Path:
        txn = self.root / "data" / "txn"
        txn.mkdir(parents=True, exist_ok=True)
        return txn

    def lock_path(self) -> Path:
        """Beside the repository folder, so every publisher finds it whatever its keys folder.

        Not inside it: ``data/txn`` is emptied by recovery, and the folder itself is served.
        """
        return self.root.resolve().parent / f".{self.root.resolve().name}.cvmfs-ml.lock"

    # -- layout -------------------------------------------------------------------------------
    def create_skeleton(self) -> None:
        """``data/00`` .. ``data/ff`` and ``data/txn``, as ``cvmfs_server mkfs`` makes them."""
        for i in range(256):
            (self.root / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        (self.root / "data" / "txn").mkdir(parents=True, exist_ok=True)

    def path(self, rel_path: str) -> Path:
        rel = rel_path.lstrip("/")
        if ".." in Path(rel).parts:
            raise NotFoundError(rel_path, str(self.root))
        return self.root / rel

    def _temp_file(self) -> BinaryIO:
        txn = self.root / "data" / "txn"
        txn.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=txn, prefix="obj.", delete=False)

    # -- writing ------------------------------------------------------------------------------
    def exists(self, rel_path: str) -> bool:
        return self.path(rel_path).exists()

    def put_bytes(self, rel_path: str, data: bytes, *, durable: bool = False) -> None:
        """Write atomically; ``durable`` also fsyncs (used for the manifest and whitelist)."""
        self.put_parts(rel_path, [data], durable=durable)

    def put_object(self, stored: bytes, kind: ObjectKind, algorithm: Algorithm) -> Digest:
        """Store bytes under their content address (unless already there); returns the hash."""
        digest = hash_bytes(stored, algorithm)
        rel = object_path(digest, kind)
        if not self.exists(rel):
            self.put_bytes(rel, stored)
        return digest

    def put_parts(
        self, rel_path: str, parts: Sequence[bytes | memoryview], *, durable: bool = False
    ) -> None:
        """Write an object given as pieces (no joining copy), atomically.

        The temporary name is unique per process and thread and created with ``O_EXCL``, so
        concurrent writers never share a file; the last rename wins, with identical content.
        """
        target = self.path(rel_path)
        txn = self.root / "data" / "txn"
        tmp = txn / f"obj.{os.getpid()}.{threading.get_ident()}.{next(_counter)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            txn.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = sum(memoryview(part).nbytes for part in parts)
            if durable or size < WRITEBACK_FROM or not self._write_direct(fd, parts):
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
                elif size >= WRITEBACK_FROM:
                    start_writeback(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(tmp, target)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)

    def _write_direct(self, fd: int, parts: Sequence[bytes | memoryview]) -> bool:
        """Large objects go around the page cache (:func:`write_parts_direct`): a publisher
        writes them once, and whoever reads them (a Stratum 1, a proxy) does so later, if at
        all. False where the file system refuses, which is remembered."""
        if not self.direct_writes:
            return False
        if write_parts_direct(fd, parts):
            return True
        self.direct_writes = False
        return False

    def object_writer(self) -> ObjectWriter:
        return ObjectWriter(self)

    def put_file(self, rel_path: str, source: Path) -> None:
        """Move a finished file from the staging area into place (one rename)."""
        target = self.path(rel_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(source, 0o644)
        os.replace(source, target)

    def link(self, rel_path: str, target_rel: str) -> None:
        link = self.path(rel_path)
        if link.is_symlink():
            return
        tmp = link.with_name(f"{link.name}.{os.getpid()}.{next(_counter)}.tmp")
        os.symlink(target_rel, tmp)
        os.replace(tmp, link)

    def swap_bytes(self, rel_path: str, data: bytes, expected: bytes | None) -> None:
        """Compare-and-swap a root file (the manifest), durably.

        The compare and the rename are two steps; callers hold :meth:`lock_path`'s lock, which
        every publisher of this folder takes, so the compare catches a writer that did not.
        """
        target = self.path(rel_path)
        with open(self.lock_path().with_suffix(".swap"), "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                current: bytes | None = target.read_bytes()
            except FileNotFoundError:
                current = None
            if current != expected:
                raise PublishError(
                    f"{rel_path} of {self.root} changed while this transaction ran (another "
                    "publisher?); nothing was published, try again"
                )
            self.put_parts(rel_path, [data], durable=True)
            _fsync_dir(target.parent)

    def flush(self) -> None:
        """Every object and catalog written so far reaches the disk before the manifest does.

        One ``syncfs`` of the repository's file system instead of an ``fsync`` per object: the
        objects are written by many threads, and one call costs the same disk writes.
        """
        fd = os.open(self.root, os.O_RDONLY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def remove_many(self, rel_paths: Sequence[str]) -> int:
        return sum(self.remove(rel) for rel in rel_paths)

    def remove(self, rel_path: str) -> bool:
        try:
            self.path(rel_path).unlink()
            return True
        except FileNotFoundError:
            return False

    def clean_staging(self) -> int:
        """Remove leftovers of killed publishers from ``data/txn``; returns how many."""
        txn = self.root / "data" / "txn"
        count = 0
        if txn.is_dir():
            for leftover in txn.iterdir():
                with contextlib.suppress(OSError):
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover)
                    else:
                        leftover.unlink()
                    count += 1
        return count

    # -- reading ------------------------------------------------------------------------------
    def get_bytes(self, rel_path: str) -> bytes:
        try:
            return self.path(rel_path).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(rel_path, str(self.root)) from exc

    def list_sizes(self) -> Iterator[tuple[str, int]]:
        for rel in self.list_objects():
            with contextlib.suppress(FileNotFoundError):
                yield rel, self.path(rel).stat().st_size

    def list_objects(self) -> Iterator[str]:
        """Every object path (``data/xx/...``), excluding the staging area."""
        data = self.root / "data"
        if not data.is_dir():
            return
        for bucket in sorted(data.iterdir()):
            if len(bucket.name) != 2 or not bucket.is_dir():
                continue
            for entry in sorted(bucket.iterdir()):
                yield f"data/{bucket.name}/{entry.name}"

    # -- the fetcher interface (same as client.fetcher.Fetcher) -------------------------------
    def fetch(
        self,
        rel_path: str,
        expected: Digest | None,
        *,
        compressed: bool,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> bytes:
        """Read an object, check its hash when ``expected`` is given, inflate if compressed.

        ``nocache`` exists for interface parity with the HTTP fetcher; a folder has no proxy.
        ``max_bytes`` bounds the content (stored and inflated): beyond it is a FormatError.
        """
        stored = self._read_bounded(rel_path, max_bytes, compressed)
        return decode_verified(stored, rel_path, expected, compressed, max_bytes)

    def _read_bounded(self, rel_path: str, max_bytes: int | None, compressed: bool) -> bytes:
        if max_bytes is None:
            return self.get_bytes(rel_path)
        limit = stored_bound(max_bytes, compressed)
        try:
            with self.path(rel_path).open("rb") as handle:
                stored = handle.read(limit + 1)
        except FileNotFoundError as exc:
            raise NotFoundError(rel_path, str(self.root)) from exc
        if len(stored) > limit:
            raise FormatError(rel_path, f"larger than {limit} bytes")
        return stored

    def fetch_into(
        self,
        rel_path: str,
        expected: Digest | None,
        compressed: bool,
        fileobj: BinaryIO,
        *,
        nocache: bool = False,
        max_bytes: int | None = None,
    ) -> int:
        """Stream an object into ``fileobj`` with bounded memory; returns bytes written.

        ``max_bytes`` bounds what is written (inflated content): beyond it is a FormatError.
        """
        try:
            source = self.path(rel_path).open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(rel_path, str(self.root)) from exc
        with source:
            blocks = iter(lambda: source.read(_READ_BLOCK), b"")
            return copy_verified(blocks, rel_path, expected, compressed, fileobj, max_bytes)
