"""Stratum 1 replication: ``cvmfs-ml replica sync`` (cvmfs-format.md §11, swissknife_pull.cc).

A replica is a byte-for-byte copy of the Stratum 0's web root that any static web server
(docs/nginx.conf) serves to clients exactly as the Stratum 0 would. A snapshot runs in the order
that keeps the replica consistent at every instant, whatever happens to the process:

1. the source must allow replication (``.cvmfs_master_replica``; a 404 means no);
2. the manifest ensemble is fetched past proxy caches and verified as a client would: whitelist
   (master key, name, expiry), certificate (hash, whitelisted fingerprint), manifest signature;
   a manifest older than the replica's is refused (no rollback);
3. meta-info and the current history are copied, and the history's tags listed;
4. catalogs are walked from the trunk root (on later runs also back along
   ``previous_revision``, so the revisions published between two snapshots are there), then
   from every tagged root. Each catalog is stored only after every object it references and
   every nested catalog below it, so a catalog present in the replica proves its whole subtree
   is present: the walk stops there (the Merkle property) and a re-run copies only what is new;
5. the certificate, the replica's own reflog, the whitelist and, last, ``.cvmfspublished`` are
   written, byte for byte (a Stratum 1 cannot re-sign); then ``.cvmfs_last_snapshot`` and
   ``.cvmfs_status.json``.

Every object is hash-checked on arrival (the fetcher checks the raw bytes against the name) and
lands by an atomic rename from ``data/txn``, so clients of the replica see the old revision
until the new manifest replaces the old one, and an interrupted snapshot leaves only temporary
files (removed by the next run). Objects download in parallel. ``.cvmfs_is_snapshotting`` marks
a snapshot in progress; a lock file in ``data/txn`` keeps two snapshots of one replica apart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cvmfs_ml.client.config import folder_fqrn, load_blacklist
from cvmfs_ml.client.trust import (
    MAX_CERTIFICATE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_WHITELIST_BYTES,
    Blacklist,
    TrustAnchors,
    parse_manifest,
    refuse_rollback,
    verify_ensemble,
)
from cvmfs_ml.cvmfs.catalog import Catalog, NestedRef, sized_objects
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.history import HistoryDb
from cvmfs_ml.cvmfs.keys import load_public_keys
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.objects import (
    MAX_UNSIZED_OBJECT,
    Decompressor,
    ObjectKind,
    object_path,
    stored_bound,
)
from cvmfs_ml.errors import (
    DownloadError,
    FormatError,
    LockedError,
    NotFoundError,
    PublishError,
    SignatureError,
)
from cvmfs_ml.replica.reflog import root_refs, updated_reflog
from cvmfs_ml.replica.report import SyncReport
from cvmfs_ml.storage.base import ObjectSource, ObjectStore, open_store
from cvmfs_ml.storage.info import STATUS_JSON, date_utc, updated_status
from cvmfs_ml.storage.local import LocalStore
from cvmfs_ml.storage.reflog_repair import reachable_references

__all__ = ["SyncReport", "sync_replica"]

MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
REFLOG = ".cvmfsreflog"
MASTER_REPLICA = ".cvmfs_master_replica"
LAST_SNAPSHOT = ".cvmfs_last_snapshot"
IS_SNAPSHOTTING = ".cvmfs_is_snapshotting"

_LOCK_NAME = "replica.lock"
_TEMP_PREFIX = "replica."
_READ_BLOCK = 4 * 2**20


def sync_replica(
    upstream: str | os.PathLike[str],
    dest_repo_dir: str | os.PathLike[str],
    public_keys: str | os.PathLike[str] | Sequence[Any],
    fqrn: str | None = None,
    *,
    proxy: str | None = None,
    workers: int = 8,
    full_history: bool = False,
    now: dt.datetime | None = None,
    s3_config: Mapping[str, str] | None = None,
    on_report: Callable[[SyncReport], None] | None = None,
    blacklist: Blacklist | None = None,
    **fetcher_options: Any,
) -> SyncReport:
    """Bring the replica at ``dest_repo_dir`` up to the revision ``upstream`` publishes.

    ``upstream`` is a repository URL (``http://host/cvmfs/<fqrn>``; upstream's ``;``-separated
    ``CVMFS_SERVER_URL`` syntax with ``@fqrn@`` works too) or a local repository folder.
    ``public_keys`` are the master public keys (a ``.pub`` file, a folder of them, or loaded
    keys). ``fqrn`` defaults to the URL's last component or the folder's manifest. ``proxy``
    (``CVMFS_HTTP_PROXY`` syntax) and ``fetcher_options`` (``timeout``, ``max_retries``...) go
    to the HTTP fetcher. ``full_history`` also copies, on the first run, every earlier revision
    still reachable through ``previous_revision`` (later runs always copy the revisions
    published since the last one). ``now`` is the time the whitelist's expiry is checked
    against. ``upstream`` may also be a Stratum 0 in S3 (``s3://BUCKET[/PREFIX]/FQRN``, read
    through the S3 API with the ``CVMFS_S3_*`` settings of ``s3_config``). ``blacklist``
    (default: the site's, see :func:`~cvmfs_ml.client.config.load_blacklist`) refuses
    certificates and revisions. Idempotent: a second run with nothing new published copies
    nothing. ``on_report`` receives the report as soon as the run starts; its counters grow
    while objects are copied (progress bars).
    """
    started = time.monotonic()
    keys = (
        load_public_keys(public_keys)
        if isinstance(public_keys, (str, os.PathLike))
        else list(public_keys)
    )
    if not keys:
        raise SignatureError("no master public key to verify the upstream whitelist with")
    if str(upstream).startswith("s3://"):
        s3_store = open_store(str(upstream), s3_config)
        source, fqrn, label = s3_store, fqrn or s3_store.location.rsplit("/", 1)[-1], str(upstream)
    else:
        source, fqrn, label = _open_source(upstream, fqrn, proxy, workers, fetcher_options)
    try:
        dest = open_store(os.fspath(dest_repo_dir), s3_config)
        dest.create_skeleton()
        with _exclusive(dest.staging_dir() / _LOCK_NAME, dest.location):
            _remove_leftovers(dest.staging_dir())
            when = now or dt.datetime.now(dt.UTC)
            dest.put_bytes(IS_SNAPSHOTTING, (date_utc(when) + "\n").encode())
            try:
                anchors = TrustAnchors(
                    fqrn, keys, blacklist if blacklist is not None else load_blacklist()
                )
                snapshot = _Snapshot(source, dest, anchors, when, workers, label)
                snapshot.on_report = on_report
                report = snapshot.run(full_history=full_history)
            finally:
                dest.remove(IS_SNAPSHOTTING)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    report.seconds = time.monotonic() - started
    return report


# ---------------------------------------------------------------------------------- snapshot


@dataclass
class _Level:
    """A catalog of the walk waiting for its nested catalogs: closed, only its downloaded
    (compressed) file on disk, the nested references still to visit and its objects' futures."""

    digest: Digest
    rel: str
    stored: Path
    previous: Digest | None
    nested: list[NestedRef]
    pending: list[Future[None]]


class _Snapshot:
    """One run of :func:`sync_replica` (the steps of the module docstring)."""

    def __init__(
        self,
        source: ObjectSource,
        dest: ObjectStore,
        anchors: TrustAnchors,
        now: dt.datetime,
        workers: int,
        label: str,
    ) -> None:
        self.source = source
        self.dest = dest
        self.anchors = anchors
        self.fqrn = anchors.fqrn
        self.now = now
        self.label = label
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._scheduled: dict[str, Future[None]] = {}
        self._new_catalogs: list[Digest] = []
        self._tag_roots: list[Digest] = []
        self.report: SyncReport
        self.on_report: Callable[[SyncReport], None] | None = None

    # -- the steps ----------------------------------------------------------------------------
    def run(self, *, full_history: bool = False) -> SyncReport:
        self._check_replication_allowed()
        raw_manifest = self._fetch_root_file(MANIFEST, MAX_MANIFEST_BYTES)
        raw_whitelist = self._fetch_root_file(WHITELIST, MAX_WHITELIST_BYTES)
        manifest, certificate_stored = self._verify(raw_manifest, raw_whitelist)
        previous_raw, previous = self._replica_manifest()
        if previous is not None:
            refuse_rollback(
                self.fqrn, manifest, previous.revision, previous.timestamp,
                f"the replica has it; refusing to roll back to what {self.label} offers",
            )  # fmt: skip
        self.report = SyncReport(
            fqrn=self.fqrn,
            upstream=self.label,
            revision=manifest.revision,
            root_catalog=manifest.catalog.hex,
            previous_revision=previous.revision if previous is not None else None,
            manifest_changed=previous_raw != raw_manifest,
        )
        if self.on_report is not None:
            self.on_report(self.report)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cvmfs-ml-replica") as pool:
            self._pool = pool
            try:
                self._copy_all(manifest, follow_previous=previous is not None or full_history)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        self._store_bytes(
            object_path(manifest.certificate, ObjectKind.CERTIFICATE),  # type: ignore[arg-type]
            certificate_stored,
        )
        self._write_reflog(manifest)
        self._write_alt_paths(manifest)
        if self._read_replica_file(WHITELIST) != raw_whitelist:
            self.dest.put_bytes(WHITELIST, raw_whitelist, durable=True)
        if self.report.manifest_changed:
            self.dest.flush()  # every object the manifest names is durable before it lands
            self.dest.put_bytes(MANIFEST, raw_manifest, durable=True)
        self._write_status()
        return self.report

    def _check_replication_allowed(self) -> None:
        try:
            self._fetch_root_file(MASTER_REPLICA, MAX_MANIFEST_BYTES)
        except (NotFoundError, DownloadError) as exc:
            if not _is_missing(exc):
                raise
            raise PublishError(
                f"{self.label} does not allow replication: it serves no {MASTER_REPLICA} "
                "(a Stratum 0 publishes that file when it may be replicated)"
            ) from exc

    def _verify(self, raw_manifest: bytes, raw_whitelist: bytes) -> tuple[Manifest, bytes]:
        """Check the ensemble with the client's trust core; returns the manifest and the
        certificate object as stored (copied byte for byte)."""
        manifest = parse_manifest(self.anchors, raw_manifest)
        if manifest.certificate is None:
            raise FormatError(MANIFEST, "no certificate (X) to verify the signature with")
        rel = object_path(manifest.certificate, ObjectKind.CERTIFICATE)
        stored = self.source.fetch(
            rel, manifest.certificate, compressed=False, max_bytes=MAX_CERTIFICATE_BYTES
        )
        trusted = verify_ensemble(self.anchors, raw_manifest, raw_whitelist, stored, self.now)
        return trusted.manifest, stored

    def _copy_all(self, manifest: Manifest, *, follow_previous: bool) -> None:
        if manifest.metainfo is not None:
            metainfo = manifest.metainfo
            rel = object_path(metainfo, ObjectKind.METAINFO)
            self._copy_object(rel, metainfo, stored_bound(MAX_UNSIZED_OBJECT, True))
        tags = self._copy_history(manifest)
        historic_required = not manifest.garbage_collectable
        # B, the root catalog's size inflated (0 when not given): a bound like a nested one's
        previous = self._sync_catalog(
            manifest.catalog, "", required=True, size=manifest.catalog_size
        )
        if follow_previous:
            while previous is not None:
                previous = self._sync_catalog(previous, "", required=historic_required)
        for name, root in tags:
            self.report.tags.append(name)
            self._tag_roots.append(root)
            self._sync_catalog(root, "", required=historic_required)

    def _copy_history(self, manifest: Manifest) -> list[tuple[str, Digest]]:
        if manifest.history is None:
            return []
        rel = object_path(manifest.history, ObjectKind.HISTORY)
        # unsized (no catalog gives it): bounded stored and inflated, or it could fill the disk
        self._copy_object(rel, manifest.history, stored_bound(MAX_UNSIZED_OBJECT, True))
        plain = self._temp_path()
        try:
            with plain.open("wb") as out:
                self.dest.fetch_into(rel, manifest.history, True, out, max_bytes=MAX_UNSIZED_OBJECT)
            with HistoryDb.open(plain) as history:
                return [(tag.name, tag.root_catalog) for tag in history.tags()]
        finally:
            plain.unlink(missing_ok=True)

    # -- catalogs -----------------------------------------------------------------------------
    def _sync_catalog(
        self, digest: Digest, mountpoint: str, *, required: bool, size: int = 0
    ) -> Digest | None:
        """Copy a catalog after its objects and nested catalogs; returns its predecessor.

        A catalog already in the replica stops the walk (its subtree is complete) and returns
        None. With ``required`` false, a catalog the source lacks is noted and skipped. An
        explicit stack (no recursion: nested chains can be thousands of levels deep) visits
        nested catalogs one at a time, in order, each committed after its whole subtree; a
        pending level holds no open catalog nor file descriptor (see :class:`_Level`).
        """
        root = self._open_level(digest, mountpoint, required=required, size=size)
        if root is None:
            return None
        stack = [root]
        try:
            while stack:
                level = stack[-1]
                if level.nested:
                    ref = level.nested.pop()
                    child = self._open_level(ref.digest, ref.path, required=True, size=ref.size)
                    if child is not None:
                        stack.append(child)
                    continue
                for future in level.pending:
                    future.result()
                self._commit(level.stored, level.rel)
                stack.pop()
                level.stored.unlink(missing_ok=True)
                self._count(catalogs_copied=1)
                self._new_catalogs.append(level.digest)
        finally:
            for level in stack:  # a failure: drop the downloads of the uncommitted levels
                level.stored.unlink(missing_ok=True)
        return root.previous

    def _open_level(
        self, digest: Digest, mountpoint: str, *, required: bool, size: int = 0
    ) -> _Level | None:
        """Download a catalog, read its predecessor and nested references, schedule its data
        objects and close it; None when it is in the replica already (or skipped)."""
        rel = object_path(digest, ObjectKind.CATALOG)
        if self.dest.exists(rel):
            self._count(catalogs_present=1)
            return None
        try:
            stored = self._download(rel, digest, stored_bound(size or MAX_UNSIZED_OBJECT, True))
        except (NotFoundError, DownloadError) as exc:
            if required or not _is_missing(exc):
                raise
            self.report.skipped.append(rel)
            return None
        try:
            with self._opened_catalog(stored, digest, mountpoint, size) as catalog:
                previous = catalog.previous_revision
                pending = self._copy_referenced(catalog)
                nested = catalog.nested_catalogs()
        except BaseException:
            stored.unlink(missing_ok=True)
            raise
        nested.reverse()  # popped from the end: visited in the catalog's order
        return _Level(digest, rel, stored, previous, nested, pending)

    @contextlib.contextmanager
    def _opened_catalog(
        self, stored: Path, digest: Digest, mountpoint: str, size: int = 0
    ) -> Iterator[Catalog]:
        plain = self._temp_path()
        what = f"catalog {digest.hex} ({mountpoint or '/'})"
        try:
            inflater = Decompressor(what, max_output=size or MAX_UNSIZED_OBJECT)
            with stored.open("rb") as src, plain.open("wb") as out:
                while block := src.read(_READ_BLOCK):
                    for piece in inflater.pieces(block):  # bounded memory, even for a bomb
                        out.write(piece)
                out.write(inflater.flush())
            catalog = Catalog(plain, None, what=what)
            try:
                if mountpoint and catalog.mountpoint != mountpoint:
                    raise FormatError(
                        what, f"root_prefix {catalog.mountpoint!r} != mount point {mountpoint!r}"
                    )
                yield catalog
            finally:
                catalog.close()
        finally:
            plain.unlink(missing_ok=True)

    def _copy_referenced(self, catalog: Catalog) -> list[Future[None]]:
        """Schedule every data object of ``catalog`` (each object once per snapshot)."""
        futures: list[Future[None]] = []
        for digest, is_chunk, compressed, size in sized_objects(catalog):
            rel = object_path(digest, ObjectKind.PARTIAL if is_chunk else ObjectKind.FILE)
            with self._lock:
                future = self._scheduled.get(rel)
                if future is None:
                    bound = stored_bound(size, compressed)  # an endless body cannot fill the disk
                    future = self._pool.submit(self._copy_object, rel, digest, bound)
                    self._scheduled[rel] = future
            futures.append(future)
        return futures

    # -- objects ------------------------------------------------------------------------------
    def _copy_object(self, rel: str, digest: Digest, max_bytes: int | None = None) -> None:
        if self.dest.exists(rel):
            self._count(objects_present=1)
            return
        stored = self._download(rel, digest, max_bytes)
        try:
            self._commit(stored, rel)
        finally:
            stored.unlink(missing_ok=True)
        self._count(objects_copied=1)

    def _download(self, rel: str, digest: Digest, max_bytes: int | None = None) -> Path:
        """The stored (compressed) bytes of ``rel`` in a temporary file, hash-checked."""
        tmp = self._temp_path()
        try:
            with tmp.open("w+b") as out:
                written = self.source.fetch_into(rel, digest, False, out, max_bytes=max_bytes)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._count(bytes_copied=written)
        return tmp

    def _commit(self, tmp: Path, rel: str) -> None:
        self.dest.put_file(rel, tmp)

    def _store_bytes(self, rel: str, data: bytes) -> None:
        if self.dest.exists(rel):
            return
        self.dest.put_bytes(rel, data)
        self._count(objects_copied=1, bytes_copied=len(data))

    def _temp_path(self) -> Path:
        return self.dest.staging_dir() / f"{_TEMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex}"

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self.report, name, getattr(self.report, name) + amount)

    # -- root files ---------------------------------------------------------------------------
    def _fetch_root_file(self, name: str, max_bytes: int) -> bytes:
        """A mutable root file, fresh from the source (past proxy caches when there are any)."""
        return self.source.fetch(name, None, compressed=False, nocache=True, max_bytes=max_bytes)

    def _read_replica_file(self, name: str) -> bytes | None:
        try:
            return self.dest.get_bytes(name)
        except NotFoundError:
            return None

    def _replica_manifest(self) -> tuple[bytes | None, Manifest | None]:
        raw = self._read_replica_file(MANIFEST)
        if raw is None:
            return None, None
        try:
            return raw, Manifest.parse(raw)
        except FormatError as exc:  # damaged by a disk or by hand: every sync would stop here
            raise FormatError(
                f"the replica's {self.dest.location.rstrip('/')}/{MANIFEST}",
                f"{exc.reason}; remove it and run replica sync again (what was copied is "
                "reused, and the revision it had is no longer checked against rollback)",
            ) from exc

    def _write_reflog(self, manifest: Manifest) -> None:
        """The replica's own reflog: every root object it holds (upstream S1s keep one too)."""
        existing = self._read_replica_file(REFLOG)
        if existing is not None and not self._new_catalogs and not self.report.manifest_changed:
            return
        tmp = self._temp_path()
        try:
            self.report.reflog_rebuilt = updated_reflog(
                tmp, existing, self.fqrn, root_refs(manifest, self._new_catalogs),
                lambda: reachable_references(self.dest, manifest, self._tag_roots),
            )  # fmt: skip
            self.dest.put_file(REFLOG, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _write_alt_paths(self, manifest: Manifest) -> None:
        """``.cvmfsalt-<hash><suffix>`` links (clients use them only if the manifest has A=yes)."""
        if not manifest.alt_paths:
            return
        for digest, kind in (
            (manifest.catalog, ObjectKind.CATALOG),
            (manifest.certificate, ObjectKind.CERTIFICATE),
            (manifest.history, ObjectKind.HISTORY),
            (manifest.metainfo, ObjectKind.METAINFO),
        ):
            if digest is None:
                continue
            self.dest.link(f".cvmfsalt-{digest.hex}{kind.value}", object_path(digest, kind))

    def _write_status(self) -> None:
        stamp = date_utc(self.now)
        self.dest.put_bytes(LAST_SNAPSHOT, (stamp + "\n").encode())
        existing = self._read_replica_file(STATUS_JSON)
        self.dest.put_bytes(STATUS_JSON, updated_status(existing, last_snapshot=stamp))


# ---------------------------------------------------------------------------------- helpers


def _open_source(
    upstream: str | os.PathLike[str],
    fqrn: str | None,
    proxy: str | None,
    workers: int,
    fetcher_options: dict[str, Any],
) -> tuple[ObjectSource, str, str]:
    """``(source, fqrn, label)`` for a URL chain or a local folder."""
    text = os.fspath(upstream)
    if "://" in text:
        from cvmfs_ml.client.config import DIRECT, parse_proxy_list, parse_server_urls
        from cvmfs_ml.client.fetcher import Fetcher

        if fqrn is None:
            first = next((u.strip() for u in text.split(";") if u.strip()), "")
            fqrn = urlsplit(first).path.rstrip("/").rsplit("/", 1)[-1]
            if not fqrn or "@" in fqrn:
                raise PublishError(f"cannot tell the repository name from {first!r}: pass --fqrn")
        urls = parse_server_urls(text, fqrn)
        groups = parse_proxy_list(proxy) if proxy else [[DIRECT]]
        options = {"pool_size": max(1, workers), **fetcher_options}
        return Fetcher(urls, groups, **options), fqrn, " ".join(urls)
    if fetcher_options or proxy:
        raise PublishError("proxy and fetcher options only apply to an http(s) upstream")
    folder = Path(text)
    if not (folder / MANIFEST).is_file():
        raise NotFoundError(str(folder / MANIFEST), "no repository to replicate")
    # The name comes from the caller or the folder, never from the manifest being verified.
    return LocalStore(folder), fqrn or folder_fqrn(folder), str(folder)


@contextlib.contextmanager
def _exclusive(lock_path: Path, replica: str) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"another replica sync of {replica} is running") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(staging: Path) -> None:
    """Temporary files of an interrupted snapshot (we hold the lock: nobody else writes)."""
    for leftover in staging.glob(_TEMP_PREFIX + "*"):
        if leftover.name != _LOCK_NAME:
            with contextlib.suppress(OSError):
                leftover.unlink()


def _is_missing(exc: BaseException) -> bool:
    """A 404 from every server (or a missing file), as opposed to servers being down."""
    if isinstance(exc, NotFoundError):
        return True
    if isinstance(exc, DownloadError) and exc.attempts:
        return all(reason.startswith("HTTP 404") for _url, _proxy, reason in exc.attempts)
    return False
