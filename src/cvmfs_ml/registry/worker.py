"""One publishing thread per repository: batches of queued CIDs become one revision each.

The thread claims every waiting job of its repository (up to the batch limits), unpacks their
tarballs into one transaction and commits once, so fifty small CIDs arriving together cost one
revision, not fifty. If the batch fails, its jobs are retried one by one so a single bad job
fails alone. Cleanup runs in the same thread (it needs the repository lock anyway); while it
runs the service routes new CIDs to the other repository.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvmfs_ml.errors import ConfigError, CvmfsMlError, is_disk_full
from cvmfs_ml.models.publish import open_published
from cvmfs_ml.publish.gc import collect_garbage
from cvmfs_ml.publish.repository import Publisher, PublishResult
from cvmfs_ml.registry.cid import ContentId
from cvmfs_ml.registry.config import ConfigFile
from cvmfs_ml.registry.jobs import Job, JobStore
from cvmfs_ml.registry.metrics import RegistryMetrics
from cvmfs_ml.registry.tarballs import tarball_items
from cvmfs_ml.replica.sync import sync_replica

__all__ = ["CleanupReport", "RepositoryWorker"]

log = logging.getLogger("cvmfs_ml.registry")


@dataclass(frozen=True)
class CleanupReport:
    repository: str
    removed: list[str]
    revision: int | None
    objects_removed: int
    bytes_removed: int


def check_poll_seconds(poll_seconds: float) -> float:
    """``poll_seconds`` if a worker can idle that long between looks at its queue."""
    if not 0 < poll_seconds <= 3600:  # 0 or less would spin a core; NaN fails too
        raise ConfigError(f"the worker's poll must be above 0 and at most 3600 s, "
                          f"not {poll_seconds:g}")  # fmt: skip
    return poll_seconds


class RepositoryWorker:
    """The publishing thread of one repository."""

    def __init__(
        self,
        publisher: Publisher,
        store: JobStore,
        config: ConfigFile,
        metrics: RegistryMetrics,
        *,
        poll_seconds: float = 1.0,
        stratum1: Path | None = None,
        index: int = 0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        check_poll_seconds(poll_seconds)
        self.publisher = publisher
        self.stratum1 = Path(stratum1) / publisher.fqrn if stratum1 is not None else None
        self.fqrn = publisher.fqrn
        self.store = store
        self.config = config
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.cleaning = False
        self.loops = 0  # passes through the loop: /healthz shows the thread is turning
        self.index = index  # staggers the daily cleanups of several repositories (user-pub)
        self.clock = clock
        self._last_daily: dt.date | None = None
        self._daily_started = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cleanup_requests: list[tuple[float, threading.Event, list[CleanupReport]]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"registry-publish-{self.fqrn}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def request_cleanup(self, max_days: float, timeout: float = 600.0) -> CleanupReport:
        """Run cleanup in the worker thread and wait for its report."""
        done = threading.Event()
        out: list[CleanupReport] = []
        with self._lock:
            self._cleanup_requests.append((max_days, done, out))
            self.cleaning = True  # route new CIDs elsewhere from now on
        self._wake.set()
        if not done.wait(timeout) or not out:
            raise CvmfsMlError(f"cleanup of {self.fqrn} did not finish in {timeout:.0f} s")
        return out[0]

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.loops += 1
            with self._lock:
                requests, self._cleanup_requests = self._cleanup_requests, []
            for max_days, done, out in requests:
                try:
                    out.append(self._cleanup(max_days))
                except Exception:  # the thread must survive; the caller gets no report
                    log.exception("cleanup of %s failed", self.fqrn)
                    self.metrics.errors.labels("cleanup").inc()
                finally:
                    with self._lock:
                        self.cleaning = bool(self._cleanup_requests)
                    done.set()
            config = self.config.current()
            if self._daily_cleanup_due(config.cleanup_hour):
                self._run_daily_cleanup(config.max_days)
            try:
                jobs = self.store.claim(self.fqrn, config.batch_max_jobs, config.batch_max_bytes)
            except Exception:
                log.exception("cannot read the queue of %s", self.fqrn)
                self.metrics.errors.labels("queue").inc()
                self._wake.wait(self.poll_seconds)
                continue
            if jobs:
                self._publish(jobs)
                continue
            self._wake.wait(self.poll_seconds)

    def _daily_cleanup_due(self, hour: int) -> bool:
        """Once a day, at ``hour`` + this repository's index (UTC), as user-pub's cron does;
        a service started after that hour waits for the next day."""
        if hour < 0:
            return False
        now = self.clock()
        target = min(hour + self.index, 23)
        if not self._daily_started:
            self._daily_started = True
            self._last_daily = now.date() if now.hour >= target else None
        if now.hour < target or self._last_daily == now.date():
            return False
        self._last_daily = now.date()
        return True

    def _run_daily_cleanup(self, max_days: float) -> None:
        with self._lock:
            self.cleaning = True
        try:
            self._cleanup(max_days)
        except Exception:  # the thread must survive; tomorrow's run tries again
            log.exception("daily cleanup of %s failed", self.fqrn)
            self.metrics.errors.labels("cleanup").inc()
        finally:
            with self._lock:
                self.cleaning = bool(self._cleanup_requests)

    def _publish(self, jobs: list[Job]) -> None:
        prefix = self.config.current().prefix
        started = time.monotonic()
        try:
            result = self._commit(jobs, prefix)
        except Exception as exc:
            if len(jobs) > 1:
                if is_disk_full(exc):  # the batch's objects go before the jobs try alone
                    self.relieve_full_disk()
                log.warning("batch of %d failed in %s (%s); retrying one by one",
                            len(jobs), self.fqrn, exc)  # fmt: skip
                for job in jobs:
                    self._publish([job])
                return
            job = jobs[0]
            kind = "publish" if isinstance(exc, CvmfsMlError) else "internal"
            if is_disk_full(exc):  # expected on a service: no traceback, and room made
                kind = "disk_full"
            reason = self.failure_reason(exc, job.size)
            if kind == "internal":
                log.exception("publishing %s failed", job.cid)
            else:
                log.warning("publishing %s failed: %s", job.cid, reason)
            self.metrics.errors.labels(kind).inc()
            self.store.fail(job, reason)
            _remove(job.upload)
            return
        now = time.time()
        self.store.finish(jobs, result.revision, now)
        self.metrics.publishes.labels(self.fqrn).inc()
        self.metrics.cids_published.labels(self.fqrn).inc(len(jobs))
        self.metrics.publish_duration.labels(self.fqrn).observe(time.monotonic() - started)
        for job in jobs:
            self.metrics.time_to_visible.labels(self.fqrn).observe(max(0.0, now - job.created))
            _remove(job.upload)
        log.info("published %d CID(s) in %s revision %d", len(jobs), self.fqrn, result.revision)
        if self.stratum1 is not None:
            self._replicate(jobs)

    def failure_reason(self, exc: BaseException, size: int | None = None) -> str:
        """The reason to record for a publish into this repository that raised ``exc``; on a
        full disk, after :meth:`relieve_full_disk`."""
        if is_disk_full(exc):
            return disk_full_reason(size, self.relieve_full_disk())
        return str(exc) or type(exc).__name__

    def relieve_full_disk(self) -> int:
        """Collect garbage now, after a publish that found the repository's disk full; return
        the bytes free afterwards (-1 where the store is not a local folder).

        The failed transaction's objects stay behind (as upstream's do) until a collection,
        and on a full disk they would fail every publish until the daily cleanup.
        """
        if self.publisher.settings.garbage_collection:
            try:
                report = collect_garbage(self.publisher)
            except Exception as exc:  # a report, not a reason to stop the thread
                log.warning("garbage collection of %s on a full disk failed: %s", self.fqrn, exc)
            else:
                log.warning("%s: disk full; garbage collection removed %d objects (%d bytes)",
                            self.fqrn, report.removed, report.bytes_removed)  # fmt: skip
        if not self.publisher.is_local:  # its staging folder's disk is not the store's
            return -1
        try:
            fs = os.statvfs(self.publisher.repo_dir)
        except OSError:
            return -1
        return fs.f_bavail * fs.f_frsize

    def _replicate(self, jobs: list[Job]) -> None:
        """Snapshot the new revision into the local Stratum 1 (what clients read)."""
        assert self.stratum1 is not None
        try:
            sync_replica(self.publisher.repo_dir, self.stratum1,
                         self.publisher.keys.paths.master_public, self.fqrn)  # fmt: skip
        except Exception as exc:  # a failed snapshot is retried by the next publish
            log.warning("stratum 1 snapshot of %s failed: %s", self.fqrn, exc)
            self.metrics.errors.labels("replica").inc()
            return
        now = time.time()
        for job in jobs:
            self.metrics.time_to_stratum1.labels(self.fqrn).observe(max(0.0, now - job.created))

    def _commit(self, jobs: list[Job], prefix: str) -> PublishResult:
        with self.publisher.transaction() as txn:
            for job in jobs:
                at = ContentId.parse(job.cid).repo_path(prefix)
                txn.add_items(
                    functools.partial(tarball_items, Path(job.upload), at, job.strip),
                    at,
                    nested_catalog=True,
                )
                txn.add_bytes(f"{at}/.publisher", f"{job.publisher}\n".encode())
            names = ", ".join(job.cid for job in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
            return txn.commit(description=f"registry: {names}")

    # -- cleanup ------------------------------------------------------------------------------
    def _cleanup(self, max_days: float) -> CleanupReport:
        """Remove CIDs unused for ``max_days``, then collect garbage (user-pub's daily job)."""
        prefix = self.config.current().prefix
        cutoff = time.time() - max_days * 86400
        removed: list[str] = []
        revision = None
        if self.store.stale_cids(self.fqrn, cutoff):
            with self.publisher.transaction() as txn:
                # Listed again under the lock: an ``update`` that came in meanwhile counts.
                stale = self.store.stale_cids(self.fqrn, cutoff)
                with open_published(self.publisher) as repo:  # the publisher's cache, not TMPDIR
                    for record in stale:
                        path = ContentId(record.cid).repo_path(prefix)
                        if repo.exists(path):
                            txn.remove(path)
                            removed.append(record.cid)
                if removed:
                    txn.commit(description=f"registry cleanup: {len(removed)} CID(s)")
                self.store.forget_cids(self.fqrn, [r.cid for r in stale])
            if removed:
                # A second, empty revision moves ``trunk-previous`` past the removal, so the
                # garbage collector may free the removed CIDs' objects now, not a cleanup later.
                with self.publisher.transaction() as txn:
                    revision = txn.commit(description="registry cleanup: settle").revision
        objects = freed = 0
        if self.publisher.settings.garbage_collection:
            report = collect_garbage(self.publisher)
            objects, freed = report.removed, report.bytes_removed
        log.info("cleanup of %s: %d CID(s) removed, %d objects (%d bytes) collected",
                 self.fqrn, len(removed), objects, freed)  # fmt: skip
        return CleanupReport(self.fqrn, removed, revision, objects, freed)


def disk_full_reason(size: int | None, free: int) -> str:
    """Why an upload of ``size`` bytes failed on a full repository disk (``free``: -1 unknown)."""
    what = "this upload" if size is None else f"this upload ({size / 2**20:.1f} MiB)"
    space = f"{free / 2**20:.1f} MiB free" if free >= 0 else "free space unknown"
    return (
        f"the repository's disk is full: {what} did not fit ({space} after collecting "
        "garbage); ask the registry's operator for space"
    )


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
