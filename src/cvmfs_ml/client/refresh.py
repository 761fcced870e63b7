"""Which revision a :class:`~cvmfs_ml.client.repository.Repository` shows, kept current.

:class:`RevisionRefresh` is the part of the repository that boots it through the trust chain
(the manifest ensemble, verified by :mod:`.trust`; no rollback past the breadcrumb) and looks
for a new revision when its TTL has passed (cvmfs-format.md §10.2, §10.3), switching the tree
so that readers never see a half-loaded one. Lookups and file content stay in :mod:`.repository`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cvmfs_ml.client.ensemble import Breadcrumb, fetch_manifest, fetch_trusted
from cvmfs_ml.client.trust import refuse_rollback
from cvmfs_ml.cvmfs.catalog import Catalog
from cvmfs_ml.cvmfs.hashing import Digest
from cvmfs_ml.cvmfs.manifest import Manifest
from cvmfs_ml.cvmfs.whitelist import Whitelist
from cvmfs_ml.errors import CvmfsMlError, FormatError, RollbackError, TrustError

if TYPE_CHECKING:
    from cvmfs_ml.client.cache import ObjectCache
    from cvmfs_ml.client.trust import TrustAnchors
    from cvmfs_ml.storage.base import ObjectSource

__all__ = ["RevisionRefresh"]

log = logging.getLogger("cvmfs_ml.client.repository")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RevisionRefresh:
    """The trusted manifest of a ``Repository``, and the checks for a newer one."""

    fqrn: str
    anchors: TrustAnchors
    cache: ObjectCache
    manifest: Manifest
    root_hash: Digest
    root: Catalog
    _verify: bool
    _now: dt.datetime | None
    _lock: threading.RLock
    _catalogs: dict[tuple[str, str], Catalog]
    _tree: dict[str, Catalog]

    if TYPE_CHECKING:  # provided by Repository
        source: ObjectSource

        @property
        def revision(self) -> int: ...
        def _load_catalog(
            self, mountpoint: str, digest: Digest, size: int | None = None
        ) -> Catalog: ...

    def _init_refresh(self, *, pinned: bool) -> None:
        """State for :meth:`refresh`: set before the first boot."""
        self.pinned = pinned
        """True when a root hash or tag was asked for: :meth:`refresh` never moves the tree."""
        self.max_ttl: float | None = None
        """Upper bound of :attr:`ttl` in seconds (upstream's ``CVMFS_MAX_TTL``, in minutes)."""
        self._checked_at = time.monotonic()
        self._refresh_lock = threading.Lock()
        self._retired: list[dict[tuple[str, str], Catalog]] = []
        self.counters: collections.Counter[str] = collections.Counter()
        """Since start: ``cache_hits``/``cache_misses`` (object lookups), ``refresh_checks``,
        ``refresh_switches`` (new revisions taken) and ``refresh_failures``."""
        self._counters_lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._counters_lock:
            self.counters[name] += 1

    def _boot(self, *, nocache: bool = False) -> Manifest:
        """The newest trusted manifest: fetch and verify the manifest ensemble (§10.2).

        A proxy may hold an outdated manifest or whitelist for up to a minute (or a damaged
        one), so when verification fails the ensemble is fetched once more with
        ``Cache-Control: no-cache`` before the error is raised. Download errors are not retried
        here: the fetcher has already tried every proxy and host.
        """
        try:
            return self._boot_once(nocache)
        except (TrustError, FormatError) as exc:
            if nocache or not getattr(self.source, "has_proxy_caches", False):
                raise
            log.info("%s: %s; fetching the manifest again past proxy caches", self.fqrn, exc)
            return self._boot_once(True)

    def _boot_once(self, nocache: bool) -> Manifest:
        """Fetch the manifest ensemble, have the trust core (:mod:`.trust`) verify it, then
        refuse a rollback against the breadcrumb. Each failure raises its own error type."""
        self._checked_at = time.monotonic()
        if not self._verify:
            return fetch_manifest(self.source, self.anchors, nocache=nocache)[1]
        now = self._now or _utcnow()
        trusted = fetch_trusted(self.source, self.cache, self.anchors, now=now, nocache=nocache)
        Breadcrumb(Path(self.cache.root), self.fqrn).accept(trusted.manifest)
        self.whitelist: Whitelist = trusted.whitelist
        self.certificate: bytes = trusted.certificate
        return trusted.manifest

    def refresh(self, *, nocache: bool = True) -> bool:
        """Look for a new revision now and switch to it; True if the tree changed.

        The new manifest goes through the whole trust chain and the rollback check; its root
        catalog is fetched and verified before the switch, so readers never see a half-loaded
        revision. A pinned repository (``root_hash`` or ``tag``) keeps its tree and only
        updates :attr:`manifest` (new tags). ``nocache`` asks proxies for a fresh manifest: an
        explicit refresh wants what was just published, not a copy up to a minute old;
        :meth:`maybe_refresh`, which runs on the TTL, leaves proxy caches alone as upstream
        does. An older manifest raises :class:`~cvmfs_ml.errors.RollbackError` and the
        repository stays on its revision.
        """
        with self._refresh_lock:
            self._count("refresh_checks")
            try:
                manifest = self._boot(nocache=nocache)
            except BaseException:
                self._count("refresh_failures")
                raise
            current = self.manifest
            try:
                refuse_rollback(
                    self.fqrn, manifest, current.revision, current.timestamp,
                    f"it is open; staying on revision {current.revision}",
                )  # fmt: skip
            except RollbackError:
                self._count("refresh_failures")
                raise
            if self.pinned or manifest.catalog == self.root_hash:
                self.manifest = manifest
                return False
            try:
                root = self._load_catalog("", manifest.catalog, manifest.catalog_size or None)
            except BaseException:
                self._count("refresh_failures")
                raise
            with self._lock:
                # Catalogs of the old tree stay open for readers still walking it; those two
                # refreshes old are closed (a lookup takes milliseconds, a TTL minutes).
                old = self._catalogs
                self._catalogs = {("", manifest.catalog.hex): root}
                self._retired.append(old)
                expired = self._retired[:-2]
                del self._retired[:-2]
                self.manifest = manifest
                self.root_hash = manifest.catalog
                self.root, self._tree = root, {"": root}
            self._count("refresh_switches")
            self._close_catalogs(expired)
            return True

    def _close_catalogs(self, generations: list[dict[tuple[str, str], Catalog]]) -> None:
        in_use = {id(c) for c in self._catalogs.values()}
        for generation in generations:
            for (_mount, hex_digest), catalog in generation.items():
                if id(catalog) in in_use:
                    continue
                catalog.close()
                with contextlib.suppress(CvmfsMlError, OSError, ValueError):
                    self.cache.unpin(Digest.from_hex(hex_digest))

    @property
    def ttl(self) -> float:
        """Seconds between checks for a new revision: the root catalog's ``TTL`` property
        (default 240), capped by :attr:`max_ttl` (§10.3; the manifest's ``D`` is not used)."""
        ttl = float(self.root.ttl)
        return min(ttl, self.max_ttl) if self.max_ttl is not None else ttl

    @property
    def refresh_due(self) -> bool:
        """Whether :attr:`ttl` seconds have passed since the manifest was last checked."""
        return time.monotonic() - self._checked_at >= self.ttl

    @property
    def seconds_to_check(self) -> float:
        """Seconds until :attr:`refresh_due` (0 when it is due now)."""
        return max(0.0, self.ttl - (time.monotonic() - self._checked_at))

    def maybe_refresh(self) -> bool:
        """:meth:`refresh` when the TTL has passed (call it from long-running readers).

        Like upstream, a failed check (servers unreachable, an outdated or untrusted manifest)
        keeps the current, already verified revision: it is logged, not raised, and retried
        after another TTL. A check already running in another thread is not repeated.
        """
        if not self.refresh_due or self._refresh_lock.locked():
            return False
        try:
            return self.refresh(nocache=False)
        except (CvmfsMlError, OSError) as exc:
            self._checked_at = time.monotonic()
            log.warning("%s: staying on revision %d: %s", self.fqrn, self.revision, exc)
            return False
