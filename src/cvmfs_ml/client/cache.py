"""Local cache of verified, decompressed objects, shared by processes (cvmfs-format.md §10.7).

Layout, as upstream's POSIX cache::

    <root>/00 ... <root>/ff       objects, decompressed, at <xx>/<rest of hex + algorithm id>
    <root>/txn/                   files being written (<pid>.<random>.tmp), renamed when complete
    <root>/quarantaine/           entries found corrupt, kept for inspection (sic, upstream's name)
    <root>/cachedb                SQLite in WAL mode: LRU order, sizes, checksums and pins

Why it is safe with several processes and threads:

* An object appears at its final path only by ``os.replace`` of a complete file in ``txn/``, and
  only while holding the cachedb write lock (``BEGIN IMMEDIATE``) in which its row is written.
  Eviction deletes rows and files under the same lock, so rows and files change together. A
  crash mid-write leaves only a ``txn/`` file, removed by the next :class:`ObjectCache` once its
  writer process is gone. A row whose file vanished, or a file without a row, is treated as
  missing (and rewritten by the next put); :meth:`ObjectCache.fsck` tidies both.
* Pins are rows ``(digest, pid)`` rather than upstream's single ``pinned`` flag, so a process that
  dies while holding pins (a catalog it had open) does not keep them forever: eviction ignores
  pins whose process is gone.
* Readers that ``open()`` an object keep reading it even if it is evicted meanwhile (POSIX unlink
  semantics); :meth:`ObjectCache.get_path` callers must expect ``FileNotFoundError`` on a later
  open and refetch.
* The cache must live on a local file system: SQLite's WAL mode does not work over NFS, and pins
  and ``txn/`` files are matched to processes by pid.

Corruption detection: what each check guards against, and what it costs (issue 14 item 3).
Objects are stored decompressed, so their name (the hash of the compressed bytes) cannot be
re-checked without recompressing; the checks are therefore:

* **Content hash, at fetch** (:mod:`.fetcher`): a wrong, truncated or tampered object from a
  server, proxy or network never enters the cache. Cost: one hash pass while downloading,
  overlapped with the network; nothing on reads.
* **Size, on every lookup** (one ``stat``, a few microseconds per piece and open): truncation,
  a file replaced by another object's, a half-written file. A read that comes up short of the
  catalog's size is also refused (``IntegrityError``) and the entry quarantined.
* **CRC-32 of the content**, computed while the file is written (no extra read) and kept in the
  cachedb: accidents on the local disk - bit flips by other writers, torn writes, a file
  rewritten in place. Files up to :data:`ALWAYS_VERIFY_BYTES` are checked on every lookup. A
  larger file is trusted without re-reading when its inode and ctime equal the ``stamp``
  recorded at commit (any write to the file, or a rename over it, moves ctime, and ctime cannot
  be set back without changing the system clock); otherwise it is checked once per process
  (again if its inode, mtime or size change), and after a good check stamped, so entries from
  before stamps existed, or restored from a copy, cost one check and then none. The check costs
  ~0.1 s per GB with ISA-L (~0.5 s with zlib) plus reading the file: on a warm read (page cache
  cold) that is a whole extra pass over the disk before the first byte is served, which is why
  the stamp exists. The read benchmark's breakdown counts these passes (``CRC n/seconds``).

Not caught between checks: damage that does not move ctime (media errors below the file
system) in a file already stamped, until an explicit :meth:`ObjectCache.verify` reads it; and
an attacker with write access to the cache, who could fix up the cachedb too.
Upstream's cache does not check content on reads at all (``cvmfs_fsck`` does, offline).

Quota and disk space: :mod:`.cache_space` (eviction down to half the quota, like upstream, and
room made when the disk fills up first). Lookups update the LRU order in batches; the cachedb
connection and those batches: :mod:`.cache_connection`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cvmfs_ml.client import cachedb
from cvmfs_ml.client.cache_connection import CacheConnection
from cvmfs_ml.client.cache_file import TxnFile, crc32, crc_of_file
from cvmfs_ml.client.cache_space import CacheSpace, CacheUsage
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.storage import sqlitefile

log = logging.getLogger(__name__)

__all__ = ["ALWAYS_VERIFY_BYTES", "CacheUsage", "ObjectCache", "TxnFile", "crc32"]

ALWAYS_VERIFY_BYTES = 64 * 1024
"""Entries up to this size are checksummed on every lookup (larger ones once per process)."""

_QUARANTINE_KEEP = 16
_STALE_TXN_SECONDS = 24 * 3600


class ObjectCache(CacheConnection, CacheSpace):
    """Verified, decompressed objects by digest, with a quota, LRU eviction and pins.

    ``quota_bytes`` of ``None`` means unlimited. One instance may be shared by threads; several
    processes may open the same ``root`` at once.
    """

    def __init__(self, root: Path | str, quota_bytes: int | None = None) -> None:
        if quota_bytes is not None and quota_bytes <= 0:
            raise ConfigError(f"CVMFS_QUOTA_LIMIT: cache quota must be positive, got {quota_bytes}")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.txn_dir = self.root / "txn"
        self.quarantine_dir = self.root / "quarantaine"
        self._make_dirs()
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._db: sqlite3.Connection | None = None
        self._inherited: list[sqlite3.Connection] = []
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._touches: dict[str, None] = {}
        self._last_flush = time.monotonic()
        with self._locked():
            try:
                self._connect()
            except sqlite3.DatabaseError as exc:
                if not sqlitefile.is_damage(exc):  # busy, locked, unreadable, disk full
                    raise
                aside = cachedb.set_aside_if_damaged(self.root)
                if aside is not None:  # (else another process did it a moment ago)
                    log.warning("cache %s: its database was damaged (%s); moved to %s, the "
                                "cache starts empty", self.root, exc, aside.name)  # fmt: skip
                self._connect()
        self._clean_txn()

    # ------------------------------------------------------------------ setup

    def _make_dirs(self) -> None:
        if (self.root / "ff").is_dir() and self.txn_dir.is_dir() and self.quarantine_dir.is_dir():
            return
        for i in range(256):
            (self.root / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        self.txn_dir.mkdir(exist_ok=True)
        self.quarantine_dir.mkdir(exist_ok=True)

    def _clean_txn(self) -> None:
        """Remove ``txn/`` files left by writers that died (the crash-mid-write case)."""
        now = time.time()
        for entry in os.scandir(self.txn_dir):
            pid_text = entry.name.split(".", 1)[0]
            try:
                pid = int(pid_text)
                stale = now - entry.stat().st_mtime > _STALE_TXN_SECONDS
            except (ValueError, FileNotFoundError):
                pid, stale = -1, True
            if stale or not cachedb.pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    # ------------------------------------------------------------------ paths

    def path_of(self, digest: Digest) -> Path:
        """Where ``digest`` lives when cached (whether or not it is)."""
        text = digest.hex
        return self.root / text[:2] / text[2:]

    def _new_txn(self, size_hint: int | None = None) -> TxnFile:
        """A new file in ``txn/``; the folders are made again if something removed them (a
        temporary-file cleaner, ``rm -rf`` of the cache under a running mount)."""
        for attempt in range(2):
            try:
                return TxnFile(self.txn_dir / f"{os.getpid()}.{uuid.uuid4().hex}.tmp", size_hint)
            except FileNotFoundError:
                if attempt:
                    raise
                self._make_dirs()
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ lookups

    def contains(self, digest: Digest) -> bool:
        """Whether ``digest`` has an entry and a file (no checksum check)."""
        rows = self._read("SELECT 1 FROM cache_catalog WHERE sha1 = ?", (digest.hex,))
        return bool(rows) and self.path_of(digest).is_file()

    def get_path(self, digest: Digest) -> Path | None:
        """The path of a cached, checked object, or ``None`` (missing, or found corrupt).

        A corrupt entry is moved to ``quarantaine/`` and reported as missing, so the caller's
        normal miss path (fetch, then put) repairs it.
        """
        text = digest.hex
        rows = self._read("SELECT size, checksum, stamp FROM cache_catalog WHERE sha1 = ?", (text,))
        if not rows:
            return None
        size, checksum = int(rows[0][0]), int(rows[0][1])  # type: ignore[call-overload]
        stamp = rows[0][2]
        path = self.path_of(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._forget_missing(text, path)
            return None
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if st.st_size != size:
            self._quarantine(text, path, st)
            return None
        # A large file whose inode and ctime are those recorded at commit has not been written
        # since (any write or rename moves ctime, and ctime cannot be set back), so it is
        # trusted without re-reading it: a warm read then costs one pass, not two.
        untouched = stamp == f"{st.st_ino}:{st.st_ctime_ns}" and st.st_size > ALWAYS_VERIFY_BYTES
        if not untouched and (
            st.st_size <= ALWAYS_VERIFY_BYTES or self._verified.get(text) != identity
        ):
            try:
                actual = crc_of_file(path)
            except FileNotFoundError:
                self._forget_missing(text, path)
                return None
            if actual != checksum:
                self._quarantine(text, path, st)
                return None
            self._verified[text] = identity
            if st.st_size > ALWAYS_VERIFY_BYTES:
                self._restamp(text, path, st)
        self._touch(text)
        return path

    def _restamp(self, text: str, path: Path, before: os.stat_result) -> None:
        """Record the stamp of a large file just verified in full, so later processes trust it.

        Entries written before stamps existed (or whose file was copied or restored, which
        moves the inode or ctime) cost one full CRC pass per process until then. Recorded only
        if the file did not change during the pass (same inode and ctime before and after):
        from then on the guarantee is the one a stamp written at commit gives.
        """
        try:
            after = path.stat()
        except FileNotFoundError:
            return
        if (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns):
            return
        with self._write() as db:
            db.execute(
                "UPDATE cache_catalog SET stamp = ? WHERE sha1 = ? AND size = ?",
                (f"{after.st_ino}:{after.st_ctime_ns}", text, after.st_size),
            )

    def open(self, digest: Digest) -> BinaryIO | None:
        """Open a cached, checked object for reading, or ``None`` (see :meth:`get_path`).

        An open file stays readable even if the entry is evicted meanwhile.
        """
        path = self.get_path(digest)
        if path is None:
            return None
        try:
            return open(path, "rb")  # the caller closes it
        except FileNotFoundError:  # evicted by another process between check and open
            return None

    def verify(self, digest: Digest, size: int | None = None) -> bool:
        """Fully check an entry now: size (also against ``size``, e.g. the catalog's) and CRC.

        Returns ``False`` when the object is missing or was corrupt; a corrupt entry goes to
        ``quarantaine/``.
        """
        text = digest.hex
        rows = self._read("SELECT size, checksum FROM cache_catalog WHERE sha1 = ?", (text,))
        path = self.path_of(digest)
        if not rows:
            return False
        want_size, checksum = int(rows[0][0]), int(rows[0][1])  # type: ignore[call-overload]
        try:
            st = path.stat()
            good = (
                st.st_size == want_size
                and (size is None or size == want_size)
                and crc_of_file(path) == checksum
            )
        except FileNotFoundError:
            self._forget_missing(text, path)
            return False
        if not good:
            self._quarantine(text, path, st)
            return False
        self._verified[text] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return True

    def invalidate(self, digest: Digest, checked: os.stat_result | None = None) -> None:
        """Move the entry the caller found wrong (``checked``: its ``stat``) to ``quarantaine/``."""
        self._quarantine(digest.hex, self.path_of(digest), checked)

    # ------------------------------------------------------------------ adding

    def put_bytes(
        self, digest: Digest, data: bytes | bytearray | memoryview, *, pin: bool = False
    ) -> Path:
        """Store ``data`` (verified, decompressed content of ``digest``) atomically.

        ``pin`` pins it in the same transaction, so eviction can never remove it in between.
        """
        txn = self._new_txn()
        try:
            txn.write(data)
        except BaseException:
            txn._discard()
            raise
        return self._commit(digest, txn, pin)

    @contextlib.contextmanager
    def put_stream(
        self, digest: Digest, *, pin: bool = False, size_hint: int | None = None
    ) -> Iterator[TxnFile]:
        """A file to write ``digest``'s content into; committed when the block exits cleanly.

        ``size_hint`` (the catalog's size) reserves the file's blocks first (:func:`preallocate`).

        On an exception nothing is added and the temporary file is removed. After the block,
        ``txn.committed_path`` is the object's path::

            with cache.put_stream(digest) as txn:
                fetcher.fetch_into(object_path(digest, kind), digest, True, txn)
        """
        txn = self._new_txn(size_hint)
        try:
            yield txn
        except BaseException:
            txn._discard()
            raise
        self._commit(digest, txn, pin)

    def _commit(self, digest: Digest, txn: TxnFile, pin: bool) -> Path:
        text = digest.hex
        final = self.path_of(digest)
        try:
            size, checksum = txn._finish()
            if self.quota_bytes is not None and size > self.quota_bytes:
                raise ConfigError(
                    f"CVMFS_QUOTA_LIMIT: object {text} ({size} bytes) is larger than the "
                    f"cache quota ({self.quota_bytes} bytes)"
                )
            with self._write() as db:
                self._flush_touches(db)
                try:
                    os.replace(txn.path, final)
                except FileNotFoundError:  # its folder was removed (see _new_txn)
                    final.parent.mkdir(exist_ok=True)
                    os.replace(txn.path, final)
                old = db.execute(
                    "SELECT size FROM cache_catalog WHERE sha1 = ?", (text,)
                ).fetchone()
                seq = cachedb.next_seq(db)
                db.execute(
                    "INSERT OR REPLACE INTO cache_catalog (sha1, size, acseq, type, checksum) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (text, size, seq, 1 if pin else 0, checksum),
                )
                cachedb.add_size(db, size - (int(old[0]) if old else 0))
                if pin:
                    cachedb.pin(db, text, os.getpid())
                if self.quota_bytes is not None and cachedb.total(db) > self.quota_bytes:
                    self._evict(db, self.quota_bytes // 2, keep=text)
                st = final.stat()  # under the lock: nobody can evict it yet
                db.execute(
                    "UPDATE cache_catalog SET stamp = ? WHERE sha1 = ?",
                    (f"{st.st_ino}:{st.st_ctime_ns}", text),
                )
        except BaseException:
            txn._discard()
            raise
        self._verified[text] = (st.st_ino, st.st_mtime_ns, st.st_size)
        txn.committed_path = final
        return final

    # ------------------------------------------------------------------ pins

    def pin(self, digest: Digest) -> None:
        """Keep ``digest`` from eviction until :meth:`unpin` (counted; per process)."""
        with self._write() as db:
            cachedb.pin(db, digest.hex, os.getpid())

    def unpin(self, digest: Digest) -> None:
        """Undo one :meth:`pin` by this process."""
        with self._write() as db:
            db.execute(
                "UPDATE pins SET count = count - 1 WHERE sha1 = ? AND pid = ?",
                (digest.hex, os.getpid()),
            )
            db.execute("DELETE FROM pins WHERE count <= 0")

    def is_pinned(self, digest: Digest) -> bool:
        """Whether a live process pins ``digest``."""
        rows = self._read("SELECT pid FROM pins WHERE sha1 = ?", (digest.hex,))
        return any(cachedb.pid_alive(int(pid)) for (pid,) in rows)  # type: ignore[call-overload]

    # ------------------------------------------------------------------ upkeep

    def wipe(self) -> None:
        """Remove every object, pin and quarantined file (``bench drop-caches``).

        Processes that still have objects open keep reading them; their pins are gone.
        """
        with self._write() as db:
            cachedb.empty(db)
            cachedb.remove_entries(self.root)
            shutil.rmtree(self.quarantine_dir, ignore_errors=True)
            self.quarantine_dir.mkdir(exist_ok=True)
            self._verified.clear()
            self._touches.clear()
        self._clean_txn()

    def fsck(self) -> tuple[int, int]:
        """Reconcile files and rows after crashes; return (rows dropped, files removed).

        Rows whose file is gone are dropped; files without a row are removed; the running total
        is recomputed. Scans all 256 folders, so it is for maintenance, not for every start.
        """
        dropped = removed = 0
        with self._write() as db:
            known = {row[0] for row in db.execute("SELECT sha1 FROM cache_catalog")}
            on_disk: set[str] = set()
            for i in range(256):
                prefix = f"{i:02x}"
                for entry in os.scandir(self.root / prefix):
                    text = prefix + entry.name
                    if text in known:
                        on_disk.add(text)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        removed += 1
            missing = known - on_disk
            db.executemany("DELETE FROM cache_catalog WHERE sha1 = ?", [(t,) for t in missing])
            dropped = len(missing)
            cachedb.recount(db)
        return dropped, removed

    def close(self) -> None:
        """Write pending LRU updates and close the cachedb connection."""
        with self._locked():
            if self._db is None:
                return
            self._write_touches()
            self._db.close()
            self._db = None

    def __enter__(self) -> ObjectCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _forget_missing(self, text: str, path: Path) -> None:
        with self._write() as db:
            if path.exists():  # re-added meanwhile
                return
            old = db.execute("SELECT size FROM cache_catalog WHERE sha1 = ?", (text,)).fetchone()
            if old:
                db.execute("DELETE FROM cache_catalog WHERE sha1 = ?", (text,))
                cachedb.add_size(db, -int(old[0]))
        self._verified.pop(text, None)

    def _quarantine(self, text: str, path: Path, checked: os.stat_result | None = None) -> None:
        """Move ``path`` (``checked``: the file found wrong) aside and forget its row."""
        with self._write() as db:  # the lock every commit's rename holds
            # Two readers (a job and the prefetcher) can find one corrupt copy at once: the
            # first may have stored a fresh copy already, which the second must leave alone.
            if checked is not None:
                try:
                    if not os.path.samestat(path.stat(), checked):
                        return
                except FileNotFoundError:
                    return
            old = db.execute("SELECT size FROM cache_catalog WHERE sha1 = ?", (text,)).fetchone()
            if old:
                db.execute("DELETE FROM cache_catalog WHERE sha1 = ?", (text,))
                cachedb.add_size(db, -int(old[0]))
            target = self.quarantine_dir / f"{text}.{os.getpid()}.{time.time_ns()}"
            try:
                os.replace(path, target)
            except FileNotFoundError:
                pass
            except OSError as exc:  # pragma: no cover - cross-device or permission trouble
                if exc.errno != errno.EXDEV:
                    raise
                os.unlink(path)
        self._verified.pop(text, None)
        self._prune_quarantine()

    def _prune_quarantine(self) -> None:
        entries = sorted(os.scandir(self.quarantine_dir), key=lambda e: e.name.rsplit(".", 1)[-1])
        for entry in entries[:-_QUARANTINE_KEEP]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
